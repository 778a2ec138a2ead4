//! `oxvirt engine`: the manager, on its own.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use oxvirt_engine::app::EngineSettings;
use oxvirt_engine::daemon::{Engine, EngineConfig};

#[derive(clap::Args, Clone)]
pub struct EngineArgs {
    /// Data directory: the SQLite database and the engine's CA.
    #[arg(long, default_value = "/var/lib/oxvirt/engine")]
    pub data: PathBuf,
    /// Address the engine's HTTPS API listens on.
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,
    /// PostgreSQL URL (`postgres://…`); SQLite in the data directory when absent.
    #[arg(long, env = "OXVIRT_DB_URL")]
    pub db_url: Option<String>,
    #[command(flatten)]
    pub tuning: Tuning,
}

/// Engine tunables shared by `oxvirt engine` and `oxvirt up`.
#[derive(clap::Args, Clone)]
pub struct Tuning {
    /// Lease I/O timeout N in seconds (renew 2N, fence at 8N). oVirt's default is 10.
    #[arg(long, default_value_t = 10.0)]
    pub io_timeout: f64,
    /// Seconds added to 8N before a dead host's leases may be taken; keep 60 when sanlock
    /// hosts share the storage.
    #[arg(long, default_value_t = 60.0)]
    pub fence_margin: f64,
    /// Accelerator for VMs: auto, kvm or tcg (each node's default when absent).
    #[arg(long)]
    pub accel: Option<String>,
    /// Host monitoring interval in seconds.
    #[arg(long, default_value_t = 3.0)]
    pub monitor_interval: f64,
}

impl Tuning {
    pub fn settings(&self) -> anyhow::Result<EngineSettings> {
        let secs = |v: f64, what: &str| -> anyhow::Result<Duration> {
            anyhow::ensure!(
                v.is_finite() && v > 0.0 && v < 3600.0,
                "{what} must be between 0 and 3600 seconds"
            );
            Ok(Duration::from_secs_f64(v))
        };
        if let Some(a) = &self.accel {
            a.parse::<oxvirt_qemu::Accel>().map_err(anyhow::Error::msg)?;
        }
        Ok(EngineSettings {
            io_timeout: secs(self.io_timeout, "--io-timeout")?,
            fence_margin: secs(self.fence_margin, "--fence-margin")?,
            monitor_interval: secs(self.monitor_interval, "--monitor-interval")?,
            accel: self.accel.clone(),
            ..EngineSettings::default()
        })
    }
}

pub fn config(args: &EngineArgs) -> anyhow::Result<EngineConfig> {
    Ok(EngineConfig {
        data_dir: args.data.clone(),
        db_url: args.db_url.clone(),
        listen: args.listen,
        admin_password: std::env::var("OXVIRT_ADMIN_PASSWORD")
            .ok()
            .filter(|p| !p.is_empty()),
        settings: args.tuning.settings()?,
    })
}

/// Prints where to reach the engine and how to log in.
pub fn print_access(engine: &Engine) {
    println!("engine API:       https://{}/ovirt-engine/api", engine.addr);
    println!("web portal:       https://{}/portal/", engine.addr);
    println!("engine CA:        sha256 {}", engine.ca_fingerprint());
    match &engine.generated_admin_password {
        Some(p) => println!("admin@internal:   password {p}   (generated now; shown once)"),
        None => println!("admin@internal:   password unchanged (OXVIRT_ADMIN_PASSWORD sets it)"),
    }
}

pub fn run(args: EngineArgs) -> anyhow::Result<()> {
    let cfg = config(&args)?;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async move {
        let engine = Engine::start(cfg, crate::routes())
            .await
            .context("starting the engine")?;
        print_access(&engine);
        let token = engine.enroll_token(None, Duration::from_secs(3600));
        println!(
            "enroll a node:    oxvirt node --engine {} --token {token} --name NAME (valid 1 h)",
            engine.addr
        );
        crate::node_cmd::shutdown_signal().await;
        engine.shutdown().await;
        println!("engine stopped; hosts and VMs keep running");
        anyhow::Ok(())
    })
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackupMode {
    Backup,
    Restore,
}

#[derive(clap::Args, Clone)]
pub struct BackupArgs {
    /// backup: the engine's database and PKI into --file (the engine may run); restore: from
    /// --file into a new, empty data directory (and an empty PostgreSQL database or schema).
    #[arg(long, value_enum)]
    pub mode: BackupMode,
    /// The backup file.
    #[arg(long)]
    pub file: PathBuf,
    /// The engine's data directory.
    #[arg(long, default_value = "/var/lib/oxvirt/engine")]
    pub data: PathBuf,
    /// PostgreSQL URL; SQLite in the data directory when absent.
    #[arg(long, env = "OXVIRT_DB_URL")]
    pub db_url: Option<String>,
}

/// `oxvirt engine-backup`: oVirt's `engine-backup --mode=backup|restore`.
pub fn run_backup(args: BackupArgs) -> anyhow::Result<()> {
    use oxvirt_engine::backup;
    let state = backup::EngineState {
        data_dir: args.data.clone(),
        db_url: args.db_url.clone(),
    };
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let m = rt.block_on(async {
        match args.mode {
            BackupMode::Backup => backup::backup(&state, &args.file)
                .await
                .with_context(|| format!("backing up the engine in {}", args.data.display())),
            BackupMode::Restore => backup::restore(&args.file, &state)
                .await
                .with_context(|| format!("restoring {} into {}", args.file.display(), args.data.display())),
        }
    })?;
    let what = match args.mode {
        BackupMode::Backup => "backed up into",
        BackupMode::Restore => "restored from",
    };
    println!(
        "engine {what} {} ({:?} database, schema version {}, oxvirt {})",
        args.file.display(),
        m.database,
        m.schema_version,
        m.oxvirt
    );
    if args.mode == BackupMode::Restore {
        println!(
            "start the engine on {}: it reconciles with the nodes",
            args.data.display()
        );
    }
    Ok(())
}
