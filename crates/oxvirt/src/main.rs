//! The `oxvirt` binary: a thin command-line edge over the crates.
//!
//! Architecture invariant: no logic lives here that a crate should own; subcommands parse
//! arguments, call a crate, and print.

mod cli;
mod domain_cmd;
mod engine_cmd;
mod lease_cmd;
mod node_cmd;
mod up;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "oxvirt",
    version,
    about = "oVirt's architecture in two small binaries"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// All-in-one: engine, node(s) and local storage under one data directory.
    Up(up::UpArgs),
    /// The engine: database, REST API, enrollment, monitoring, scheduling.
    Engine(engine_cmd::EngineArgs),
    /// Back up the engine (database and PKI, while it runs) or restore it into a new data
    /// directory, as oVirt's engine-backup.
    EngineBackup(engine_cmd::BackupArgs),
    /// The node daemon (oxvirt's VDSM): serves the node API over mutual TLS.
    Node(node_cmd::NodeArgs),
    /// Offline storage-domain administration: create, inspect, check, dump chains, volume verbs.
    Domain(domain_cmd::DomainArgs),
    /// Lease administration (like `sanlock direct`): init, dump, read, hold lockspaces and resources.
    Lease(lease_cmd::LeaseArgs),
    /// The node's fence watchdog (started by `oxvirt node`): kills its lease-holding QEMUs
    /// when the node stops renewing their leases.
    FenceWatchdog(node_cmd::WatchdogArgs),
    /// Report what this host offers for running VMs (QEMU, qemu-img, KVM).
    HostCheck {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    #[command(flatten)]
    Client(cli::ClientCommand),
}

/// The engine's routes beyond enrollment: the web admin portal, the oVirt REST API v4 and SSO.
fn routes() -> Option<oxvirt_engine::daemon::ExtraRoutes> {
    Some(oxvirt_engine::portal::routes_with(oxvirt_engine::rest::routes()))
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("OXVIRT_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Up(args) => up::run(args),
        Command::HostCheck { json } => up::host_check(json),
        Command::Domain(args) => domain_cmd::run(args),
        Command::Lease(args) => lease_cmd::run(args),
        Command::Node(args) => node_cmd::run_node(args),
        Command::FenceWatchdog(args) => node_cmd::run_watchdog(args),
        Command::Engine(args) => engine_cmd::run(args),
        Command::EngineBackup(args) => engine_cmd::run_backup(args),
        Command::Client(c) => cli::run(c, <Cli as clap::CommandFactory>::command()),
    }
}
