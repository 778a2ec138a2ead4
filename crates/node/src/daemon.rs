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
    /// Address of the image transfer listener (ovirt-imageio's protocol; see
    /// [`crate::imageio`]). Default: the API's address with port 0 (any free port), which the
    /// node reports with each ticket.
    pub imageio_listen: Option<SocketAddr>,
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
    // Image transfer clients carry a ticket, not a certificate.
    let transfer_tls = Arc::new(oxvirt_pki::server_config(&identity, None)?);
    let transfer_addr = cfg
        .imageio_listen
        .unwrap_or_else(|| SocketAddr::new(cfg.listen.ip(), 0));
    let transfer_listener = TcpListener::bind(transfer_addr)
        .await
        .map_err(|source| DaemonError::Listen {
            addr: transfer_addr,
            source,
        })?;
    let migration_tls = run_dir.join("migration-tls");
    write_migration_tls(&migration_tls, &identity).map_err(|source| DaemonError::Dir {
        path: migration_tls.clone(),
        source,
    })?;
    let node = Node::start(NodeConfig {
        name: cfg.name.clone(),
        migration_tls: Some(migration_tls),
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
    if let Ok(a) = transfer_listener.local_addr() {
        node.images.set_port(a.port());
        tracing::info!(listen = %a, "image transfers serving (TLS, tickets)");
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let transfers = tokio::spawn(crate::imageio::http::serve(
        transfer_listener,
        transfer_tls,
        node.images.clone(),
        async move {
            let mut rx = stop_rx;
            let _ = rx.wait_for(|s| *s).await;
        },
    ));
    tracing::info!(name = %cfg.name, listen = %listener.local_addr().unwrap_or(cfg.listen), "node API serving (mutual TLS)");
    let r = serve_api(listener, tls, node, cfg.limits, shutdown).await;
    let _ = stop_tx.send(true);
    let _ = transfers.await;
    r
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

/// Lays this node's certificate out as QEMU's `tls-creds-x509` reads it, for encrypted
/// migrations: the same certificate serves as server (destination) and client (source); the
/// engine's CA checks the peer. Rewritten at every start (derived from `pki/`), the key
/// readable by its owner only.
fn write_migration_tls(dir: &std::path::Path, id: &Identity) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    for (name, pem, mode) in [
        ("ca-cert.pem", &id.ca_pem, 0o644),
        ("server-cert.pem", &id.cert_pem, 0o644),
        ("client-cert.pem", &id.cert_pem, 0o644),
        ("server-key.pem", &id.key_pem, 0o600),
        ("client-key.pem", &id.key_pem, 0o600),
    ] {
        let tmp = dir.join(format!(".{name}.tmp"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(pem.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(name))?;
    }
    std::fs::File::open(dir)?.sync_all()
}
