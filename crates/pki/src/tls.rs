//! rustls configurations for the engine ↔ node API.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::{Identity, PkiError, Role};

pub(crate) fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|_| PkiError::BadPem { what: "certificate" })?;
    if certs.is_empty() {
        return Err(PkiError::BadPem { what: "certificate" });
    }
    Ok(certs)
}

fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| PkiError::BadPem { what: "private key" })
}

fn roots(ca_pem: &str) -> Result<Arc<RootCertStore>, PkiError> {
    let mut roots = RootCertStore::empty();
    for c in certs_from_pem(ca_pem)? {
        roots.add(c)?;
    }
    Ok(Arc::new(roots))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Role and common name read from a certificate's subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub role: Role,
    pub name: String,
}

/// Reads the role (organizational unit) and common name of a DER certificate.
pub fn peer_identity(der: &[u8]) -> Option<PeerIdentity> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let role = subject
        .iter_organizational_unit()
        .next()?
        .as_str()
        .ok()
        .and_then(Role::parse)?;
    let name = subject.iter_common_name().next()?.as_str().ok()?.to_string();
    Some(PeerIdentity { role, name })
}

/// Verifies the chain with webpki, then insists on the client's role.
#[derive(Debug)]
struct RoleVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    role: Role,
}

impl ClientCertVerifier for RoleVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        match peer_identity(end_entity) {
            Some(p) if p.role == self.role => Ok(ok),
            _ => Err(rustls::Error::General(format!(
                "client certificate is not an {} certificate",
                self.role.as_str()
            ))),
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A TLS server presenting `identity`. With `client_role`, a client certificate issued by the
/// same CA with that role is required; without, no client certificate is asked for (the
/// engine's enrollment and SSO endpoints, a node that has not enrolled yet).
pub fn server_config(
    identity: &Identity,
    client_role: Option<Role>,
) -> Result<rustls::ServerConfig, PkiError> {
    let builder =
        rustls::ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match client_role {
        Some(role) => {
            let inner =
                WebPkiClientVerifier::builder_with_provider(roots(&identity.ca_pem)?, provider()).build()?;
            builder.with_client_cert_verifier(Arc::new(RoleVerifier { inner, role }))
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_single_cert(
        certs_from_pem(&identity.cert_pem)?,
        key_from_pem(&identity.key_pem)?,
    )?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// A TLS client that trusts only `ca_pem` and presents `identity` when given.
pub fn client_config(ca_pem: &str, identity: Option<&Identity>) -> Result<rustls::ClientConfig, PkiError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca_pem)?);
    let cfg = match identity {
        Some(id) => {
            builder.with_client_auth_cert(certs_from_pem(&id.cert_pem)?, key_from_pem(&id.key_pem)?)?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(cfg)
}

/// A client that accepts any server certificate. Used only to fetch the engine's CA during
/// enrollment, whose fingerprint is then checked (or trusted on first use, when the admin gave
/// a one-time token but no fingerprint).
pub fn trust_any_server_config() -> Result<rustls::ClientConfig, PkiError> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny))
        .with_no_client_auth())
}

#[derive(Debug)]
struct AcceptAny;

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider().signature_verification_algorithms.supported_schemes()
    }
}
