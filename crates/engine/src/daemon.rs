//! `oxvirt engine`: opens the database, resumes unfinished sagas, serves HTTPS (enrollment, the
//! REST API) and monitors hosts until stopped. Stopping it touches no host: VMs keep running,
//! the SPM keeps serving, and a restarted engine reconciles with what the nodes report.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use oxvirt_pki::{CertAuthority, Identity, Role};
use oxvirt_rpc::{Handler, HttpRequest, Limits, Reply};

use crate::app::{App, EngineSettings};
use crate::commands::{AddHost, CommandError, Commands};
use crate::db::Db;
use crate::enroll::{EnrolledHost, Enrollment};
use crate::model::{ClusterId, Host};
use crate::monitor::Monitor;
use crate::nodes::NodeClients;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub data_dir: PathBuf,
    /// PostgreSQL URL; SQLite in `data_dir` when `None`.
    pub db_url: Option<String>,
    pub listen: SocketAddr,
    /// `admin@internal`'s password; generated (and returned once) when `None` on first start.
    pub admin_password: Option<String>,
    pub settings: EngineSettings,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("database")]
    Db(#[from] crate::db::DbError),
    #[error("certificates")]
    Pki(#[from] oxvirt_pki::PkiError),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Command(#[from] CommandError),
}

/// Extra routes served next to enrollment (the REST API, the web portal).
pub type ExtraRoutes =
    Arc<dyn Fn(Arc<Engine>, HttpRequest) -> futures_util::future::BoxFuture<'static, Reply> + Send + Sync>;

pub struct Engine {
    pub cmds: Commands,
    pub enrollment: Arc<Enrollment>,
    pub addr: SocketAddr,
    /// Printed once by the caller when the admin password was generated.
    pub generated_admin_password: Option<String>,
    tokens: Arc<Mutex<HashMap<String, Option<ClusterId>>>>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Engine {
    /// Starts the engine; `routes` serves everything but enrollment (the REST layer).
    pub async fn start(cfg: EngineConfig, routes: Option<ExtraRoutes>) -> Result<Arc<Engine>, EngineError> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|source| EngineError::Listen {
            addr: cfg.listen,
            source,
        })?;
        let db = Db::open_in(&cfg.data_dir, cfg.db_url.as_deref()).await?;
        let admin = db.ensure_admin(cfg.admin_password.as_deref()).await?;
        let pki_dir = cfg.data_dir.join("pki");
        let ca = CertAuthority::load_or_create(&pki_dir, "oxvirt engine CA")?;
        let engine_dir = pki_dir.join("engine");
        let mut sans = vec![cfg.listen.ip().to_string(), "localhost".to_string()];
        if cfg.listen.ip().is_unspecified() {
            sans.push("127.0.0.1".into());
        }
        let identity = match Identity::load(&engine_dir)? {
            Some(id) => id,
            None => {
                let id = ca.issue(Role::Engine, "engine", &sans)?;
                id.save(&engine_dir)?;
                id
            }
        };
        let app = App::new(
            db,
            NodeClients::new(identity.clone(), Duration::from_secs(60)),
            cfg.settings.clone(),
        );
        let cmds = Commands::new(app)?;
        let (enrolled_tx, mut enrolled_rx) = mpsc::unbounded_channel::<EnrolledHost>();
        let enrollment = Arc::new(Enrollment::new(ca, move |h| {
            let _ = enrolled_tx.send(h.clone());
        }));
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| EngineError::Listen {
                addr: cfg.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| EngineError::Listen {
            addr: cfg.listen,
            source,
        })?;
        let (stop, stop_rx) = watch::channel(false);
        let engine = Arc::new(Engine {
            cmds: cmds.clone(),
            enrollment: enrollment.clone(),
            addr,
            generated_admin_password: admin.generated_password,
            tokens: Default::default(),
            stop,
            tasks: Mutex::new(Vec::new()),
        });

        // Sagas an earlier engine left unfinished go on before anything new starts.
        for h in cmds.sagas.resume_all().await.map_err(CommandError::from)? {
            tokio::spawn(async move {
                let _ = h.wait().await;
            });
        }
        cmds.resume_interrupted_maintenance().await?;

        let mut tasks = Vec::new();
        let e2 = Arc::downgrade(&engine);
        tasks.push(tokio::spawn(async move {
            while let Some(h) = enrolled_rx.recv().await {
                let Some(e) = e2.upgrade() else { return };
                let cluster = h
                    .token
                    .as_ref()
                    .and_then(|t| e.tokens.lock().expect("tokens").remove(t))
                    .flatten();
                match e
                    .cmds
                    .host_enrolled(&h.name, &h.address, cluster, Some(h.fingerprint.clone()))
                    .await
                {
                    Ok(host) => tracing::info!(host = %host.name, address = %h.address, "host registered"),
                    Err(err) => {
                        tracing::error!(host = %h.name, error = %err, "cannot register an enrolled host")
                    }
                }
                e.cmds.app.kick.notify_one();
            }
        }));
        tasks.push(tokio::spawn(Monitor::new(cmds.clone()).run(stop_rx.clone())));

        let tls = Arc::new(oxvirt_pki::server_config(&identity, None)?);
        let weak = Arc::downgrade(&engine);
        let handler: Handler = Arc::new(move |req: HttpRequest| {
            let (weak, routes) = (weak.clone(), routes.clone());
            Box::pin(async move {
                let Some(engine) = weak.upgrade() else {
                    return Reply::text(http::StatusCode::SERVICE_UNAVAILABLE, "engine stopping");
                };
                if let Some(r) = crate::enroll::route_opt(&engine.enrollment, &req) {
                    return r;
                }
                match routes {
                    Some(f) => f(engine, req).await,
                    None => Reply::text(http::StatusCode::NOT_FOUND, format!("no such path {}", req.path)),
                }
            })
        });
        let mut stop_srv = stop_rx.clone();
        let limits = Limits {
            max_body: 8 << 20,
            max_connections: 256,
            ..Limits::default()
        };
        tasks.push(tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop_srv.wait_for(|s| *s).await.is_ok();
            };
            if let Err(e) = oxvirt_rpc::serve(listener, Some(tls), handler, limits, shutdown).await {
                tracing::error!(error = %e, "engine HTTPS server failed");
            }
        }));
        engine.tasks.lock().expect("tasks").extend(tasks);
        tracing::info!(%addr, "engine serving");
        Ok(engine)
    }

    pub fn app(&self) -> &Arc<App> {
        &self.cmds.app
    }

    /// A one-time enrollment token; hosts enrolling with it join `cluster` (else the first).
    pub fn enroll_token(&self, cluster: Option<ClusterId>, ttl: Duration) -> String {
        let t = self.enrollment.issue_token(ttl);
        self.tokens.lock().expect("tokens").insert(t.clone(), cluster);
        t
    }

    /// SHA-256 of the engine CA (what `oxvirt node --ca-fingerprint` takes).
    pub fn ca_fingerprint(&self) -> String {
        self.enrollment.ca().fingerprint()
    }

    /// The CA certificate (PEM) every host's certificate chains to: what clients of image
    /// transfers verify the hosts with.
    pub fn ca_pem(&self) -> String {
        self.enrollment.ca().cert_pem()
    }

    /// The admin adds a host: recorded now, enrolled when its node asks (approved on arrival).
    pub async fn add_host(&self, req: AddHost) -> Result<Host, CommandError> {
        let h = self.cmds.add_host(req).await?;
        self.enrollment
            .preauthorize(&h.name)
            .map_err(|e| CommandError::invalid(e.to_string()))?;
        Ok(h)
    }

    /// Stops serving and monitoring; hosts and VMs are left as they are.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let tasks: Vec<_> = self.tasks.lock().expect("tasks").drain(..).collect();
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
    }
}
