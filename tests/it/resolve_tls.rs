//! The seed's TLS ladder against a real TLS registry with a test CA.

use fn_image_resolver::registry::{ErrorKind, Resolver, SetupError};

use crate::common::oci::{Pusher, samples};
use crate::common::registry::{Auth, Registry, tls_pair};
use crate::{resolver, settings};

fn ca_dir(file: &str, pem: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join(file), pem).expect("write CA");
    dir
}

async fn tls_registry() -> (Registry, String, crate::common::oci::Samples) {
    crate::common::init_crypto();
    let (ca, issued) = tls_pair("fn-image-resolver test registry CA");
    let registry = Registry::start(Some(&issued), Auth::None);
    let samples = samples();
    let ca_cert = reqwest::Certificate::from_pem(ca.cert_pem().as_bytes()).expect("ca");
    let client = reqwest::Client::builder()
        .add_root_certificate(ca_cert)
        .build()
        .expect("client");
    samples.push(&Pusher::new(registry.url(), client)).await;
    (registry, ca.cert_pem(), samples)
}

#[tokio::test]
async fn mounted_ca_as_ca_crt_or_ca_pem_verifies_the_registry() {
    let (registry, ca_pem, samples) = tls_registry().await;
    let image = format!("{}/fns/set-namespace:v0.4", registry.host);
    for file in ["ca.crt", "ca.pem"] {
        let dir = ca_dir(file, &ca_pem);
        let mut s = settings();
        s.tls_ca_dir = Some(dir.path().to_path_buf());
        let got = resolver(&s).resolve(&image, None).await.expect(file);
        assert_eq!(got.digest, samples.entrypoint.digest, "{file}");
    }
}

#[tokio::test]
async fn wrong_ca_falls_through_to_system_roots_then_fails_clearly() {
    let (registry, _ca_pem, _) = tls_registry().await;
    let (other_ca, _) = tls_pair("some other CA");
    let dir = ca_dir("ca.crt", &other_ca.cert_pem());
    let mut s = settings();
    s.tls_ca_dir = Some(dir.path().to_path_buf());
    let image = format!("{}/fns/set-namespace:v0.4", registry.host);
    let err = resolver(&s)
        .resolve(&image, None)
        .await
        .expect_err("wrong CA");
    assert_eq!(err.kind(), ErrorKind::Tls);
    let msg = err.to_string();
    assert!(
        msg.contains("the mounted CA") && msg.contains("the system roots"),
        "{msg}"
    );
    assert!(
        !msg.contains("plain HTTP"),
        "not insecure, so no plain HTTP: {msg}"
    );

    // TLS support off: only the system roots, which do not know the test CA.
    let err = resolver(&settings())
        .resolve(&image, None)
        .await
        .expect_err("untrusted");
    assert_eq!(err.kind(), ErrorKind::Tls, "{err}");
}

#[test]
fn missing_or_broken_ca_files_are_startup_errors_naming_the_path() {
    crate::common::init_crypto();
    let empty = tempfile::tempdir().expect("tempdir");
    let mut s = settings();
    s.tls_ca_dir = Some(empty.path().to_path_buf());
    let err = Resolver::new(&s).expect_err("no CA file");
    assert!(matches!(err, SetupError::Tls(_)));
    let msg = err.to_string();
    assert!(
        msg.contains(&empty.path().display().to_string()) && msg.contains("ca.crt or ca.pem"),
        "{msg}"
    );

    let garbage = ca_dir("ca.crt", "not a certificate\n");
    s.tls_ca_dir = Some(garbage.path().to_path_buf());
    let msg = Resolver::new(&s).expect_err("garbage").to_string();
    assert!(
        msg.contains("ca.crt") && msg.contains("no PEM certificate"),
        "{msg}"
    );

    let truncated = ca_dir("ca.pem", "-----BEGIN CERTIFICATE-----\nAAAA\n");
    s.tls_ca_dir = Some(truncated.path().to_path_buf());
    let msg = Resolver::new(&s).expect_err("truncated").to_string();
    assert!(msg.contains("ca.pem"), "{msg}");
}

#[tokio::test]
async fn a_registry_certificate_replaced_by_another_cas_fails_the_ladder_clearly() {
    let (mut registry, ca_pem, samples) = tls_registry().await;
    let dir = ca_dir("ca.crt", &ca_pem);
    let mut s = settings();
    s.tls_ca_dir = Some(dir.path().to_path_buf());
    let r = resolver(&s);
    let image = format!("{}/fns/set-namespace:v0.4", registry.host);
    assert_eq!(
        r.resolve(&image, None).await.expect("trusted").digest,
        samples.entrypoint.digest
    );

    // Same port, same content, a certificate from a CA nobody trusts.
    registry.stop();
    let storage = registry.dir.path().join("storage");
    let (_rogue_ca, rogue) = tls_pair("rogue CA");
    let _replaced = Registry::start_on(registry.port, Some(&rogue), Auth::None, Some(&storage));
    let err = r
        .resolve(&image, None)
        .await
        .expect_err("untrusted certificate");
    assert_eq!(err.kind(), ErrorKind::Tls, "{err}");
    assert!(err.to_string().contains("the mounted CA"), "{err}");
}
