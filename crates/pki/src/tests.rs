use super::*;
use std::os::unix::fs::PermissionsExt;

#[test]
fn ca_persists_and_keeps_its_fingerprint() {
    let dir = tempfile::tempdir().unwrap();
    let a = CertAuthority::load_or_create(dir.path(), "oxvirt CA").unwrap();
    let b = CertAuthority::load_or_create(dir.path(), "oxvirt CA").unwrap();
    assert_eq!(a.fingerprint(), b.fingerprint());
    assert_eq!(a.cert_pem(), b.cert_pem());
    let mode = std::fs::metadata(dir.path().join("ca.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(fingerprint_pem(&a.cert_pem()).unwrap(), a.fingerprint());
}

#[test]
fn csr_signing_takes_key_and_sans_but_not_the_subject() {
    let ca = CertAuthority::generate("ca").unwrap();
    let (key_pem, csr_pem) = make_csr(
        "node-claims-to-be-engine",
        &["127.0.0.2".into(), "node1.local".into()],
    )
    .unwrap();
    let cert_pem = ca.sign_csr(&csr_pem, Role::Node, "host-7").unwrap();
    let id = Identity {
        cert_pem,
        key_pem,
        ca_pem: ca.cert_pem(),
    };
    let subject = id.subject().unwrap();
    assert_eq!(
        subject,
        PeerIdentity {
            role: Role::Node,
            name: "host-7".into()
        }
    );
    // The issued identity works as a TLS server identity (key matches certificate).
    server_config(&id, Some(Role::Engine)).unwrap();
    assert!(ca.sign_csr("garbage", Role::Node, "x").is_err());
}

#[test]
fn identity_save_load_round_trip_with_private_key_mode() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertAuthority::generate("ca").unwrap();
    let id = ca.issue(Role::Engine, "engine", &["127.0.0.1".into()]).unwrap();
    assert!(Identity::load(dir.path()).unwrap().is_none());
    id.save(dir.path()).unwrap();
    let back = Identity::load(dir.path()).unwrap().unwrap();
    assert_eq!(back.cert_pem, id.cert_pem);
    assert_eq!(back.key_pem, id.key_pem);
    let mode = std::fs::metadata(dir.path().join("key.pem"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn fingerprints_compare_loosely() {
    assert!(fingerprint_matches("AB:cd:01", "abcd01"));
    assert!(!fingerprint_matches("abcd01", "abcd02"));
}
