//! `oxvirt node`: enroll if needed, then serve the API until told to stop.
//!
//! Shutdown stops the listener and ends event streams; it never touches running VMs — they keep
//! running and a restarted node finds them again.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;

use oxvirt_pki::{Identity, Role};
use oxvirt_rpc::Limits;

use crate::enroll::{enroll, EnrollConfig, EnrollError};
use crate::service::{Node, NodeConfig};

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub name: String,
    pub listen: SocketAddr,
    /// Holds `pki/` (identity) and `run/` (VM run state).
    pub data_dir: PathBuf,
    /// Needed only until the node has an identity.
    pub enroll: Option<EnrollConfig>,
    pub limits: Limits,
    /// Accelerator for VMs that do not ask for one (`auto` probes KVM).
    pub accel: oxvirt_qemu::Accel,
    /// Network namespace holding the host network the node manages (`None`: its own).
    pub netns: Option<String>,
    /// Address incoming migrations listen on (default: the API's listen address).
    pub migration_host: Option<String>,
    /// The `oxvirt` binary to run the fence watchdog with (see [`crate::watchdog`]); `None`
    /// runs none, which leaves QEMUs unguarded if this process dies.
    pub watchdog: Option<PathBuf>,
    /// Admin hook scripts (`<dir>/<point>/*`, as VDSM's hooks); default `<data_dir>/hooks`.
    pub hooks_dir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(
        "node {name:?} has no certificate: start it with the engine's address and a token or CA fingerprint"
    )]
    NotEnrolled { name: String },
    #[error("enrollment failed")]
    Enroll(#[from] EnrollError),
    #[error("key material")]
    Pki(#[from] oxvirt_pki::PkiError),
    #[error("node start")]
    Start(#[from] crate::service::NodeStartError),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub async fn run(cfg: DaemonConfig, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
    let pki_dir = cfg.data_dir.join("pki");
    let run_dir = cfg.data_dir.join("run");
    for d in [&pki_dir, &run_dir] {
        std::fs::create_dir_all(d).map_err(|source| DaemonError::Dir {
            path: d.clone(),
            source,
        })?;
    }
    // Bind before enrolling so the advertised address is known to be ours.
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| DaemonError::Listen {
            addr: cfg.listen,
            source,
        })?;
    let identity = match Identity::load(&pki_dir)? {
        Some(id) => id,
        None => match &cfg.enroll {
            Some(e) => {
                let e = EnrollConfig {
                    address: listener.local_addr().unwrap_or(cfg.listen),
                    ..e.clone()
                };
                enroll(&e, &pki_dir).await?
            }
            None => return Err(DaemonError::NotEnrolled { name: cfg.name }),
        },
    };
    let tls = Arc::new(oxvirt_pki::server_config(&identity, Some(Role::Engine))?);
    let node = Node::start(NodeConfig {
        name: cfg.name.clone(),
        run_dir,
        accel: cfg.accel,
        migration_host: cfg
            .migration_host
            .clone()
            .unwrap_or_else(|| cfg.listen.ip().to_string()),
        netns: cfg.netns.clone(),
        hooks_dir: Some(
            cfg.hooks_dir
                .clone()
                .unwrap_or_else(|| cfg.data_dir.join("hooks")),
        ),
    })
    .await?;
    if let Some(program) = &cfg.watchdog {
        crate::watchdog::start_petting(&node, program);
    }
    tracing::info!(name = %cfg.name, listen = %listener.local_addr().unwrap_or(cfg.listen), "node API serving (mutual TLS)");
    serve_api(listener, tls, node, cfg.limits, shutdown).await
}

async fn serve_api(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    node: Arc<Node>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    let addr = listener.local_addr().map_err(|source| DaemonError::Listen {
        addr: "0.0.0.0:0".parse().expect("addr"),
        source,
    })?;
    oxvirt_rpc::serve(listener, Some(tls), crate::http::handler(node), limits, shutdown)
        .await
        .map_err(|source| DaemonError::Listen { addr, source })?;
    tracing::info!("node API stopped; VMs keep running");
    Ok(())
}
