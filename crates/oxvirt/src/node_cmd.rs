//! `oxvirt node`: the node daemon.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use oxvirt_node::daemon::{run, DaemonConfig};
use oxvirt_node::enroll::EnrollConfig;

#[derive(clap::Args)]
pub struct NodeArgs {
    /// This host's name, as the engine will show it.
    #[arg(long)]
    name: String,
    /// Address the node API listens on.
    #[arg(long, default_value = "127.0.0.1:54321")]
    listen: SocketAddr,
    /// Data directory: `pki/` (this node's key and certificate) and `run/` (VM run state).
    #[arg(long, default_value = "/var/lib/oxvirt/node")]
    data: PathBuf,
    /// The engine to enroll with (`host:port`), needed until the node has a certificate.
    #[arg(long)]
    engine: Option<String>,
    /// One-time enrollment token from the engine's admin.
    #[arg(long, env = "OXVIRT_ENROLL_TOKEN")]
    token: Option<String>,
    /// SHA-256 fingerprint of the engine's CA certificate (enroll without a token, pending approval).
    #[arg(long)]
    ca_fingerprint: Option<String>,
    /// Accelerator for VMs that do not choose one: auto (KVM when the probe succeeds), kvm or tcg.
    #[arg(long, default_value = "auto")]
    accel: oxvirt_qemu::Accel,
    /// Manage the host network inside this network namespace (`ip netns add`) and run VMs
    /// there, e.g. several nodes on one machine.
    #[arg(long)]
    netns: Option<String>,
    /// Address incoming migrations listen on (default: the --listen address).
    #[arg(long)]
    migration_host: Option<String>,
    /// Hook scripts run at VM lifecycle points, `<dir>/<point>/*` (default: <data>/hooks).
    #[arg(long)]
    hooks: Option<PathBuf>,
    /// Address image uploads and downloads are served on (ovirt-imageio's protocol; oVirt
    /// uses port 54322). Default: the --listen address on any free port.
    #[arg(long)]
    imageio_listen: Option<SocketAddr>,
}

pub fn run_node(args: NodeArgs) -> anyhow::Result<()> {
    let enroll = match &args.engine {
        None => None,
        Some(engine) => {
            let (host, _) = engine.rsplit_once(':').context("--engine must be host:port")?;
            let addr = std::net::ToSocketAddrs::to_socket_addrs(engine)
                .with_context(|| format!("resolving {engine}"))?
                .next()
                .with_context(|| format!("{engine} resolves to no address"))?;
            Some(EnrollConfig {
                engine: addr,
                engine_name: host.trim_matches(['[', ']']).to_string(),
                token: args.token.clone(),
                ca_fingerprint: args.ca_fingerprint.clone(),
                name: args.name.clone(),
                address: args.listen,
                poll_interval: Duration::from_secs(2),
            })
        }
    };
    let cfg = DaemonConfig {
        name: args.name,
        listen: args.listen,
        data_dir: args.data,
        enroll,
        limits: Default::default(),
        accel: args.accel,
        netns: args.netns,
        migration_host: args.migration_host,
        hooks_dir: args.hooks,
        imageio_listen: args.imageio_listen,
        watchdog: Some(std::env::current_exe().context("locating the oxvirt binary for the fence watchdog")?),
    };
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async move { run(cfg, shutdown_signal()).await })?;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown requested");
}

#[derive(clap::Args)]
pub struct WatchdogArgs {
    /// The unix socket the node pets (`<node data>/run/watchdog.sock`).
    #[arg(long)]
    socket: PathBuf,
}

/// `oxvirt fence-watchdog`: started by the node, kills its lease-holding QEMUs if it stops
/// renewing their leases.
pub fn run_watchdog(args: WatchdogArgs) -> anyhow::Result<()> {
    oxvirt_node::watchdog::serve(&args.socket)?;
    Ok(())
}
