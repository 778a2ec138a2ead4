//! Host enrollment: nodes obtain a certificate from the engine's CA.
//!
//! A node sends a CSR with a one-time token the admin handed out: the engine signs at once. A
//! node without a token (started with the CA's fingerprint only) waits in `pending` until the
//! admin approves it, re-sending the same CSR to poll. The engine picks the certificate's subject
//! (role `node`, the host's name); the node picks only its key and names (SANs).
//!
//! Invariants: a token enrolls exactly one host, then is gone; an expired token enrolls none; a
//! pending request is approved for the CSR that was pending, not for a later one under the same
//! name.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use rand::RngCore;

use oxvirt_pki::{CertAuthority, Role};
use oxvirt_rpc::{Handler, HttpRequest, Reply};
use oxvirt_types::api::{EnrollReply, EnrollRequest, EnrollStatus, CA_PATH, ENROLL_PATH};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnrollError {
    #[error("enrollment token is unknown, used or expired")]
    BadToken,
    #[error("host name {0:?} is invalid: use letters, digits, '-', '_' and '.' (at most 64)")]
    BadName(String),
    #[error("no pending enrollment for host {0:?}")]
    NotPending(String),
    #[error("certificate request from {name:?} rejected: {reason}")]
    BadCsr { name: String, reason: String },
}

/// A host whose certificate was issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrolledHost {
    pub name: String,
    pub address: String,
    /// The token it enrolled with (the engine maps tokens to clusters).
    pub token: Option<String>,
    /// SHA-256 of the issued certificate.
    pub fingerprint: String,
}

struct Pending {
    csr: String,
    address: String,
    certificate: Option<String>,
}

#[derive(Default)]
struct State {
    tokens: HashMap<String, Instant>,
    pending: HashMap<String, Pending>,
    /// Host names the admin added: their token-less requests are approved on arrival.
    preauthorized: std::collections::HashSet<String>,
}

pub struct Enrollment {
    ca: CertAuthority,
    state: Mutex<State>,
    on_enrolled: Box<dyn Fn(&EnrolledHost) + Send + Sync>,
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Enrollment {
    /// `on_enrolled` is called once per issued certificate (the engine records the host).
    pub fn new(ca: CertAuthority, on_enrolled: impl Fn(&EnrolledHost) + Send + Sync + 'static) -> Self {
        Self {
            ca,
            state: Mutex::new(State::default()),
            on_enrolled: Box::new(on_enrolled),
        }
    }

    pub fn ca(&self) -> &CertAuthority {
        &self.ca
    }

    /// A fresh one-time token valid for `ttl`.
    pub fn issue_token(&self, ttl: Duration) -> String {
        let mut raw = [0u8; 24];
        rand::thread_rng().fill_bytes(&mut raw);
        let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let mut st = self.state.lock().expect("enrollment lock");
        let now = Instant::now();
        st.tokens.retain(|_, exp| *exp > now);
        st.tokens.insert(token.clone(), now + ttl);
        token
    }

    pub fn enroll(&self, req: &EnrollRequest) -> Result<EnrollReply, EnrollError> {
        if !valid_name(&req.name) {
            return Err(EnrollError::BadName(req.name.clone()));
        }
        let sign = || {
            self.ca
                .sign_csr(&req.csr, Role::Node, &req.name)
                .map_err(|e| EnrollError::BadCsr {
                    name: req.name.clone(),
                    reason: e.to_string(),
                })
        };
        let approved = |certificate: String| EnrollReply {
            status: EnrollStatus::Approved,
            certificate: Some(certificate),
            ca: self.ca.cert_pem(),
        };
        let mut st = self.state.lock().expect("enrollment lock");
        if let Some(token) = &req.token {
            match st.tokens.get(token) {
                Some(exp) if *exp > Instant::now() => {}
                _ => return Err(EnrollError::BadToken),
            }
            // Sign before consuming the token: a malformed CSR must not burn it.
            let cert = sign()?;
            st.tokens.remove(token);
            drop(st);
            (self.on_enrolled)(&EnrolledHost {
                name: req.name.clone(),
                address: req.address.clone(),
                token: Some(token.clone()),
                fingerprint: fingerprint_of(&cert),
            });
            tracing::info!(host = %req.name, address = %req.address, "host enrolled with a token");
            return Ok(approved(cert));
        }
        match st.pending.get(&req.name) {
            Some(p) if p.csr == req.csr => {
                if let Some(cert) = p.certificate.clone() {
                    st.pending.remove(&req.name);
                    return Ok(approved(cert));
                }
            }
            _ => {
                // Validate now so the admin never approves garbage.
                oxvirt_pki::check_csr(&req.csr).map_err(|e| EnrollError::BadCsr {
                    name: req.name.clone(),
                    reason: e.to_string(),
                })?;
                st.pending.insert(
                    req.name.clone(),
                    Pending {
                        csr: req.csr.clone(),
                        address: req.address.clone(),
                        certificate: None,
                    },
                );
                tracing::info!(host = %req.name, address = %req.address, "enrollment waits for approval");
            }
        }
        Ok(EnrollReply {
            status: EnrollStatus::Pending,
            certificate: None,
            ca: self.ca.cert_pem(),
        })
    }

    /// Hosts waiting for approval: (name, address).
    pub fn pending(&self) -> Vec<(String, String)> {
        let st = self.state.lock().expect("enrollment lock");
        st.pending
            .iter()
            .filter(|(_, p)| p.certificate.is_none())
            .map(|(n, p)| (n.clone(), p.address.clone()))
            .collect()
    }

    /// Approves a pending host: its next poll receives the certificate.
    pub fn approve(&self, name: &str) -> Result<(), EnrollError> {
        let mut st = self.state.lock().expect("enrollment lock");
        let p = st
            .pending
            .get_mut(name)
            .ok_or_else(|| EnrollError::NotPending(name.to_string()))?;
        let cert = self
            .ca
            .sign_csr(&p.csr, Role::Node, name)
            .map_err(|e| EnrollError::BadCsr {
                name: name.to_string(),
                reason: e.to_string(),
            })?;
        let host = EnrolledHost {
            name: name.to_string(),
            address: p.address.clone(),
            token: None,
            fingerprint: fingerprint_of(&cert),
        };
        p.certificate = Some(cert);
        drop(st);
        (self.on_enrolled)(&host);
        Ok(())
    }
}

fn fingerprint_of(cert_pem: &str) -> String {
    oxvirt_pki::fingerprint_pem(cert_pem).unwrap_or_default()
}

impl Enrollment {
    /// The admin added host `name`: approve its request now if it is waiting, else when it
    /// arrives.
    pub fn preauthorize(&self, name: &str) -> Result<(), EnrollError> {
        if self.pending().iter().any(|(n, _)| n == name) {
            return self.approve(name);
        }
        self.state
            .lock()
            .expect("enrollment lock")
            .preauthorized
            .insert(name.to_string());
        Ok(())
    }
}

/// HTTP handler for the enrollment endpoint and the CA download (served without client
/// certificates: a node has none yet).
pub fn handler(enrollment: Arc<Enrollment>) -> Handler {
    Arc::new(move |req: HttpRequest| {
        let e = enrollment.clone();
        Box::pin(async move { route(&e, &req) })
    })
}

/// Routes enrollment requests; `None` when the path is not ours (the engine's main router
/// falls through to the REST API).
pub fn route_opt(e: &Enrollment, req: &HttpRequest) -> Option<Reply> {
    let path_q = match &req.query {
        Some(q) => format!("{}?{q}", req.path),
        None => req.path.clone(),
    };
    if req.method == Method::GET && path_q == CA_PATH {
        return Some(Reply::Full {
            status: StatusCode::OK,
            content_type: "application/x-x509-ca-cert",
            body: Bytes::from(e.ca.cert_pem()),
        });
    }
    if req.path != ENROLL_PATH {
        return None;
    }
    if req.method != Method::POST {
        return Some(Reply::text(StatusCode::METHOD_NOT_ALLOWED, "use POST"));
    }
    let r: EnrollRequest = match serde_json::from_slice(&req.body) {
        Ok(r) => r,
        Err(err) => {
            return Some(Reply::text(
                StatusCode::BAD_REQUEST,
                format!("invalid enrollment request: {err}"),
            ))
        }
    };
    Some(match e.enroll(&r) {
        Ok(reply) => Reply::json(
            if reply.status == EnrollStatus::Approved {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            },
            &serde_json::to_value(reply).expect("reply"),
        ),
        Err(EnrollError::BadToken) => Reply::text(StatusCode::FORBIDDEN, EnrollError::BadToken.to_string()),
        Err(err) => Reply::text(StatusCode::BAD_REQUEST, err.to_string()),
    })
}

fn route(e: &Enrollment, req: &HttpRequest) -> Reply {
    route_opt(e, req)
        .unwrap_or_else(|| Reply::text(StatusCode::NOT_FOUND, format!("no such path {}", req.path)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(token: Option<String>, name: &str, csr: &str) -> EnrollRequest {
        EnrollRequest {
            token,
            csr: csr.to_string(),
            name: name.to_string(),
            address: "127.0.0.1:1".into(),
        }
    }

    #[test]
    fn tokens_are_single_use_and_bad_csrs_do_not_burn_them() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let e = Enrollment::new(CertAuthority::generate("ca").unwrap(), move |h| {
            s2.lock().unwrap().push(h.name.clone())
        });
        let t = e.issue_token(Duration::from_secs(60));
        assert!(matches!(
            e.enroll(&req(Some(t.clone()), "h1", "junk")),
            Err(EnrollError::BadCsr { .. })
        ));
        let (_, csr) = oxvirt_pki::make_csr("h1", &["127.0.0.1".into()]).unwrap();
        let r = e.enroll(&req(Some(t.clone()), "h1", &csr)).unwrap();
        assert_eq!(r.status, EnrollStatus::Approved);
        assert!(r.certificate.unwrap().contains("BEGIN CERTIFICATE"));
        assert_eq!(e.enroll(&req(Some(t), "h2", &csr)), Err(EnrollError::BadToken));
        assert_eq!(*seen.lock().unwrap(), vec!["h1".to_string()]);
        let expired = e.issue_token(Duration::ZERO);
        assert_eq!(
            e.enroll(&req(Some(expired), "h3", &csr)),
            Err(EnrollError::BadToken)
        );
        assert!(matches!(
            e.enroll(&req(None, "../x", &csr)),
            Err(EnrollError::BadName(_))
        ));
    }

    #[test]
    fn tokenless_requests_wait_for_approval_of_the_same_csr() {
        let e = Enrollment::new(CertAuthority::generate("ca").unwrap(), |_| {});
        let (_, csr) = oxvirt_pki::make_csr("h1", &[]).unwrap();
        assert_eq!(
            e.enroll(&req(None, "h1", &csr)).unwrap().status,
            EnrollStatus::Pending
        );
        assert_eq!(e.pending(), vec![("h1".to_string(), "127.0.0.1:1".to_string())]);
        assert_eq!(
            e.enroll(&req(None, "h1", &csr)).unwrap().status,
            EnrollStatus::Pending
        );
        e.approve("h1").unwrap();
        // A different CSR under the same name replaces the request instead of collecting the certificate.
        let (_, other) = oxvirt_pki::make_csr("h1", &[]).unwrap();
        let mut st = e.state.lock().unwrap();
        let approved_csr = st.pending["h1"].csr.clone();
        drop(st);
        assert_eq!(approved_csr, csr);
        assert_eq!(
            e.enroll(&req(None, "h1", &csr)).unwrap().status,
            EnrollStatus::Approved
        );
        assert_eq!(
            e.enroll(&req(None, "h1", &other)).unwrap().status,
            EnrollStatus::Pending
        );
        st = e.state.lock().unwrap();
        assert!(st.pending["h1"].certificate.is_none());
        drop(st);
        assert_eq!(e.approve("nobody"), Err(EnrollError::NotPending("nobody".into())));
    }
}
