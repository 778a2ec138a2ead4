//! oxvirt's public-key infrastructure: the engine's certificate authority, the identities it
//! issues to itself and to nodes, and the mutual-TLS configurations both sides use.
//!
//! Every certificate carries its holder's [`Role`] in the subject's organizational unit. A node's
//! API server accepts only clients whose certificate chains to the engine's CA *and* says
//! `engine`: other nodes hold certificates from the same CA and must not drive each other.
//!
//! Architecture invariant: private keys are written once, with mode 0600, atomically, and never
//! leave the file they were created in except inside a TLS handshake.

mod files;
mod tls;

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use sha2::{Digest, Sha256};

pub use files::write_private;
pub use tls::{client_config, peer_identity, server_config, trust_any_server_config, PeerIdentity};

/// Who holds a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Engine,
    Node,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Engine => "engine",
            Self::Node => "node",
        }
    }
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "engine" => Some(Self::Engine),
            "node" => Some(Self::Node),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} is not valid PEM or not what was expected")]
    BadPem { what: &'static str },
    #[error("cannot build certificate for {name:?}")]
    Generate {
        name: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("certificate signing request rejected: {0}")]
    BadCsr(String),
    #[error("TLS configuration")]
    Tls(#[from] rustls::Error),
    #[error("TLS client verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The engine's certificate authority (`ca.pem`, `ca.key` in its directory).
pub struct CertAuthority {
    /// Used only as the issuer when signing: rcgen takes the issuer's name and key from it.
    issuer: rcgen::Certificate,
    key: KeyPair,
    /// The certificate as stored and distributed; the trust root nodes pin.
    pem: String,
    der: Vec<u8>,
}

impl std::fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertAuthority")
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca.key";

impl CertAuthority {
    /// A new CA, in memory.
    pub fn generate(common_name: &str) -> Result<Self, PkiError> {
        let gen = |source| PkiError::Generate {
            name: common_name.to_string(),
            source,
        };
        let key = KeyPair::generate().map_err(gen)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
        params.distinguished_name = dn(common_name, None);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2120, 1, 1);
        let issuer = params.self_signed(&key).map_err(gen)?;
        let (pem, der) = (issuer.pem(), issuer.der().to_vec());
        Ok(Self {
            issuer,
            key,
            pem,
            der,
        })
    }

    /// Loads the CA from `dir`, creating it there on first use.
    pub fn load_or_create(dir: &Path, common_name: &str) -> Result<Self, PkiError> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        if cert_path.exists() {
            let cert_pem = files::read(&cert_path)?;
            let key_pem = files::read(&key_path)?;
            let key = KeyPair::from_pem(&key_pem).map_err(|_| PkiError::BadPem { what: "CA key" })?;
            // rcgen signs with the issuer's parameters and key only, so re-deriving a Certificate
            // from the stored one yields byte-identical issuer names in what we sign.
            let params = CertificateParams::from_ca_cert_pem(&cert_pem).map_err(|_| PkiError::BadPem {
                what: "CA certificate",
            })?;
            let issuer = params.self_signed(&key).map_err(|source| PkiError::Generate {
                name: common_name.into(),
                source,
            })?;
            let der = tls::certs_from_pem(&cert_pem)?
                .into_iter()
                .next()
                .ok_or(PkiError::BadPem {
                    what: "CA certificate",
                })?
                .to_vec();
            return Ok(Self {
                issuer,
                key,
                pem: cert_pem,
                der,
            });
        }
        let ca = Self::generate(common_name)?;
        files::write_private(&key_path, ca.key.serialize_pem().as_bytes())?;
        files::write_public(&cert_path, ca.pem.as_bytes())?;
        Ok(ca)
    }

    pub fn cert_pem(&self) -> String {
        self.pem.clone()
    }

    /// SHA-256 fingerprint of the CA certificate's DER, lowercase hex.
    pub fn fingerprint(&self) -> String {
        fingerprint_der(&self.der)
    }

    /// Issues a certificate and a fresh key (used by the engine for itself).
    pub fn issue(&self, role: Role, name: &str, sans: &[String]) -> Result<Identity, PkiError> {
        let gen = |source| PkiError::Generate {
            name: name.to_string(),
            source,
        };
        let key = KeyPair::generate().map_err(gen)?;
        let cert = leaf_params(role, name, sans)?
            .signed_by(&key, &self.issuer, &self.key)
            .map_err(gen)?;
        Ok(Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_pem: self.cert_pem(),
        })
    }

    /// Signs a node's CSR. The subject is ours to choose (role and name); only the public key
    /// and the requested subject alternative names (DNS names and IPs) are taken from the CSR.
    pub fn sign_csr(&self, csr_pem: &str, role: Role, name: &str) -> Result<String, PkiError> {
        let (public_key, sans) = parse_csr(csr_pem)?;
        let cert = leaf_params(role, name, &sans)?
            .signed_by(&public_key, &self.issuer, &self.key)
            .map_err(|source| PkiError::Generate {
                name: name.to_string(),
                source,
            })?;
        Ok(cert.pem())
    }
}

/// Checks that a CSR parses, is signed by its own key, and asks only for DNS names and IPs.
pub fn check_csr(csr_pem: &str) -> Result<(), PkiError> {
    parse_csr(csr_pem).map(|_| ())
}

fn parse_csr(csr_pem: &str) -> Result<(rcgen::PublicKey, Vec<String>), PkiError> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| PkiError::BadCsr(format!("unparsable or badly signed: {e}")))?;
    let mut sans = Vec::new();
    for san in &csr.params.subject_alt_names {
        match san {
            SanType::DnsName(n) => sans.push(n.to_string()),
            SanType::IpAddress(ip) => sans.push(ip.to_string()),
            other => {
                return Err(PkiError::BadCsr(format!(
                    "unsupported subject alternative name {other:?}"
                )))
            }
        }
    }
    Ok((csr.public_key, sans))
}

fn dn(common_name: &str, role: Option<Role>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "oxvirt");
    if let Some(r) = role {
        dn.push(DnType::OrganizationalUnitName, r.as_str());
    }
    dn.push(DnType::CommonName, common_name);
    dn
}

fn leaf_params(role: Role, name: &str, sans: &[String]) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|source| PkiError::Generate {
        name: name.to_string(),
        source,
    })?;
    params.distinguished_name = dn(name, Some(role));
    params.subject_alt_names = sans
        .iter()
        .map(|s| match s.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => s
                .clone()
                .try_into()
                .map(SanType::DnsName)
                .map_err(|_| PkiError::BadCsr(format!("invalid DNS name {s:?}"))),
        })
        .collect::<Result<_, _>>()?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2120, 1, 1);
    Ok(params)
}

/// SHA-256 of DER bytes, lowercase hex without separators.
pub fn fingerprint_der(der: &[u8]) -> String {
    Sha256::digest(der).iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 fingerprint of the first certificate in a PEM string.
pub fn fingerprint_pem(pem: &str) -> Result<String, PkiError> {
    let der = tls::certs_from_pem(pem)?
        .into_iter()
        .next()
        .ok_or(PkiError::BadPem { what: "certificate" })?;
    Ok(fingerprint_der(&der))
}

/// Compares fingerprints written with or without `:` separators, in any case.
pub fn fingerprint_matches(a: &str, b: &str) -> bool {
    let norm = |s: &str| {
        s.chars()
            .filter(|c| *c != ':')
            .map(|c| c.to_ascii_lowercase())
            .collect::<String>()
    };
    norm(a) == norm(b)
}

/// A key and a certificate request for it (what a node sends to enroll).
pub fn make_csr(name: &str, sans: &[String]) -> Result<(String, String), PkiError> {
    let gen = |source| PkiError::Generate {
        name: name.to_string(),
        source,
    };
    let key = KeyPair::generate().map_err(gen)?;
    // A CSR carries only the subject and the names; usages are the CA's to decide.
    let full = leaf_params(Role::Node, name, sans)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
    params.distinguished_name = full.distinguished_name;
    params.subject_alt_names = full.subject_alt_names;
    let csr = params.serialize_request(&key).map_err(gen)?;
    Ok((key.serialize_pem(), csr.pem().map_err(gen)?))
}

/// A certificate, its private key and the CA that issued it.
#[derive(Clone)]
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

const ID_CERT: &str = "cert.pem";
const ID_KEY: &str = "key.pem";
const ID_CA: &str = "ca.pem";

impl Identity {
    /// Loads an identity saved by [`Identity::save`]; `None` when none was saved yet.
    pub fn load(dir: &Path) -> Result<Option<Identity>, PkiError> {
        if !dir.join(ID_CERT).exists() {
            return Ok(None);
        }
        Ok(Some(Identity {
            cert_pem: files::read(&dir.join(ID_CERT))?,
            key_pem: files::read(&dir.join(ID_KEY))?,
            ca_pem: files::read(&dir.join(ID_CA))?,
        }))
    }

    /// Saves the key (mode 0600) before the certificate, so a saved certificate always has its key.
    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        files::write_private(&dir.join(ID_KEY), self.key_pem.as_bytes())?;
        files::write_public(&dir.join(ID_CA), self.ca_pem.as_bytes())?;
        files::write_public(&dir.join(ID_CERT), self.cert_pem.as_bytes())
    }

    /// Role and name from this identity's certificate.
    pub fn subject(&self) -> Result<PeerIdentity, PkiError> {
        let der = tls::certs_from_pem(&self.cert_pem)?
            .into_iter()
            .next()
            .ok_or(PkiError::BadPem { what: "certificate" })?;
        peer_identity(&der).ok_or(PkiError::BadPem {
            what: "certificate subject",
        })
    }
}

#[cfg(test)]
mod tests;
