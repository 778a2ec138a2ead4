//! Enrollment, node side: obtain a certificate from the engine's CA.
//!
//! ```text
//!  no identity ──► key + CSR (pending.key 0600, pending.csr) ──► fetch engine CA
//!      │                                                      (check fingerprint, or trust on
//!      │                                                       first use when given a token)
//!      ▼
//!  POST host-enroll {token?, csr, name, address} ── 200 approved ──► save identity (key 0600)
//!                       │
//!                       └─ 202 pending ─► wait, re-send the same CSR (admin approves)
//! ```
//!
//! The pending key survives a restart so that a node waiting for approval keeps asking with the
//! CSR the admin sees. Once saved, the identity is final: the node serves only mutual TLS with
//! clients whose certificate the same CA issued with the `engine` role.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};

use oxvirt_pki::{client_config, fingerprint_matches, fingerprint_pem, trust_any_server_config, Identity};
use oxvirt_rpc::{ClientError, RpcClient};
use oxvirt_types::api::{EnrollReply, EnrollRequest, EnrollStatus, CA_PATH, ENROLL_PATH};

#[derive(Debug, Clone)]
pub struct EnrollConfig {
    /// The engine's address and the name its certificate carries (an IP or DNS name).
    pub engine: SocketAddr,
    pub engine_name: String,
    pub token: Option<String>,
    pub ca_fingerprint: Option<String>,
    /// This host's name and the API address it advertises.
    pub name: String,
    pub address: SocketAddr,
    /// How often to ask again while the request is pending.
    pub poll_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("cannot enroll without a one-time token or the engine CA's fingerprint")]
    NoTrustAnchor,
    #[error("the engine's CA fingerprint is {got}, expected {expected}")]
    FingerprintMismatch { got: String, expected: String },
    #[error("engine at {engine} refused enrollment: HTTP {status}: {body}")]
    Refused {
        engine: SocketAddr,
        status: StatusCode,
        body: String,
    },
    #[error("engine at {engine} sent an invalid reply: {detail}")]
    Protocol { engine: SocketAddr, detail: String },
    #[error("cannot reach the engine")]
    Client(#[from] ClientError),
    #[error("key material")]
    Pki(#[from] oxvirt_pki::PkiError),
    #[error("cannot access {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

const PENDING_KEY: &str = "pending.key";
const PENDING_CSR: &str = "pending.csr";

fn pending_request(pki_dir: &Path, cfg: &EnrollConfig) -> Result<(String, String), EnrollError> {
    let (kp, cp) = (pki_dir.join(PENDING_KEY), pki_dir.join(PENDING_CSR));
    if kp.exists() && cp.exists() {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| EnrollError::Io {
                path: p.into(),
                source,
            })
        };
        return Ok((read(&kp)?, read(&cp)?));
    }
    let sans = vec![cfg.address.ip().to_string()];
    let (key, csr) = oxvirt_pki::make_csr(&cfg.name, &sans)?;
    oxvirt_pki::write_private(&kp, key.as_bytes())?;
    oxvirt_pki::write_private(&cp, csr.as_bytes())?;
    Ok((key, csr))
}

/// Enrolls with the engine and saves the identity in `pki_dir`; returns it.
pub async fn enroll(cfg: &EnrollConfig, pki_dir: &Path) -> Result<Identity, EnrollError> {
    if cfg.token.is_none() && cfg.ca_fingerprint.is_none() {
        return Err(EnrollError::NoTrustAnchor);
    }
    let (key_pem, csr) = pending_request(pki_dir, cfg)?;

    // The CA is fetched over TLS without verification, then pinned by fingerprint (or, with a
    // token only, trusted on first use — the token authenticates us, not the engine).
    let bootstrap = RpcClient::new(cfg.engine, &cfg.engine_name, trust_any_server_config()?)?;
    let (status, body) = bootstrap
        .request(Method::GET, CA_PATH, "text/plain", Bytes::new())
        .await?;
    if status != StatusCode::OK {
        return Err(EnrollError::Refused {
            engine: cfg.engine,
            status,
            body: String::from_utf8_lossy(&body).into(),
        });
    }
    let ca_pem = String::from_utf8(body.to_vec()).map_err(|_| EnrollError::Protocol {
        engine: cfg.engine,
        detail: "CA is not text".into(),
    })?;
    let got = fingerprint_pem(&ca_pem)?;
    match &cfg.ca_fingerprint {
        Some(expected) if !fingerprint_matches(&got, expected) => {
            return Err(EnrollError::FingerprintMismatch {
                got,
                expected: expected.clone(),
            })
        }
        Some(_) => {}
        None => tracing::warn!(fingerprint = %got, "trusting the engine CA on first use (token enrollment)"),
    }

    let client = RpcClient::new(cfg.engine, &cfg.engine_name, client_config(&ca_pem, None)?)?;
    let req = EnrollRequest {
        token: cfg.token.clone(),
        csr,
        name: cfg.name.clone(),
        address: cfg.address.to_string(),
    };
    let body = Bytes::from(serde_json::to_vec(&req).expect("request"));
    loop {
        let (status, reply) = client
            .request(Method::POST, ENROLL_PATH, "application/json", body.clone())
            .await?;
        if !(status == StatusCode::OK || status == StatusCode::ACCEPTED) {
            return Err(EnrollError::Refused {
                engine: cfg.engine,
                status,
                body: String::from_utf8_lossy(&reply).into(),
            });
        }
        let reply: EnrollReply = serde_json::from_slice(&reply).map_err(|e| EnrollError::Protocol {
            engine: cfg.engine,
            detail: e.to_string(),
        })?;
        match (reply.status, reply.certificate) {
            (EnrollStatus::Approved, Some(cert_pem)) => {
                let id = Identity {
                    cert_pem,
                    key_pem,
                    ca_pem,
                };
                // Refuse a certificate that does not match our key before saving anything.
                oxvirt_pki::server_config(&id, None)?;
                id.save(pki_dir)?;
                let _ = std::fs::remove_file(pki_dir.join(PENDING_CSR));
                let _ = std::fs::remove_file(pki_dir.join(PENDING_KEY));
                tracing::info!(engine = %cfg.engine, name = %cfg.name, "enrolled");
                return Ok(id);
            }
            (EnrollStatus::Approved, None) => {
                return Err(EnrollError::Protocol {
                    engine: cfg.engine,
                    detail: "approved without a certificate".into(),
                })
            }
            (EnrollStatus::Pending, _) => {
                tracing::info!(engine = %cfg.engine, name = %cfg.name, "enrollment pending the admin's approval");
                tokio::time::sleep(cfg.poll_interval).await;
            }
        }
    }
}
