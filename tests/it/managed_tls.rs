//! Self-managed serving certificates on a real API server: two replicas
//! share one Secret, the registered caBundle is its CA, a renewal happens
//! once and is served by both without a failed review.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, PostParams};
use rustls_pki_types::pem::PemObject as _;

use crate::common::k8s::{ADMIN_TOKEN, ControlPlane};
use crate::e2e::{apply_deploy, function_pod};

const SERVICE_ACCOUNT: &str = "system:serviceaccount:porch-system:fn-image-resolver";
const SECRET: &str = "fn-image-resolver-tls";

/// The leaf certificate `127.0.0.1:port` serves, trusting only `ca_pem`.
fn served_leaf(port: u16, ca_pem: &[u8]) -> Result<Vec<u8>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem) {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").map_err(|e| e.to_string())?;
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    let mut sock = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).map_err(|e| e.to_string())?;
    }
    conn.peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec())
        .ok_or_else(|| "no certificate".to_string())
}

fn key(secret: &Secret, name: &str) -> Vec<u8> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(name))
        .map(|b| b.0.clone())
        .unwrap_or_default()
}

/// A control plane with Porch's namespaces and deploy/ applied (its
/// ServiceAccount and RBAC are what the replicas run as), and an admin client.
async fn porch_with_deploy() -> (ControlPlane, kube::Client) {
    crate::common::init_crypto();
    let plane = ControlPlane::start();
    for ns in ["porch-fn-system", "porch-system"] {
        plane.create_namespace(ns).await;
    }
    let admin = plane.admin().await;
    apply_deploy(&plane);
    (plane, admin)
}

fn der(pem: &[u8]) -> Vec<u8> {
    rustls_pki_types::CertificateDer::from_pem_slice(pem)
        .expect("pem")
        .as_ref()
        .to_vec()
}

/// `serve` with the managed Secret: the webhook on `port`, registered as
/// `https://127.0.0.1:{url_port}/mutate`, certificates valid for 30 s (a
/// renewal is due about 20 s in), as the deploy's ServiceAccount. Callers
/// add their flags and spawn; the resolver endpoint's port comes with it.
fn managed_serve(
    port: u16,
    url_port: u16,
    kubeconfig: &std::path::Path,
) -> (tokio::process::Command, u16) {
    let resolver = crate::common::free_port();
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_fn-image-resolver"));
    command
        .arg("serve")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--resolver-listen", &format!("127.0.0.1:{resolver}")])
        .arg(format!("--managed-tls-secret={SECRET}"))
        .arg("--managed-tls-validity=30s")
        .arg("--register-webhook")
        .args([
            "--webhook-url",
            &format!("https://127.0.0.1:{url_port}/mutate"),
        ])
        .env("KUBECONFIG", kubeconfig)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    (command, resolver)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_secret_register_its_ca_and_renew_it_once_without_a_failed_review() {
    let (plane, admin) = porch_with_deploy().await;
    let env = crate::PlainEnv::start().await;
    let host = env.proxy.host.clone();
    let kubeconfig = plane.kubeconfig_as(SERVICE_ACCOUNT, &["system:serviceaccounts"]);
    let (port_a, port_b) = (crate::common::free_port(), crate::common::free_port());
    let replica = |port: u16| {
        let (mut command, resolver) = managed_serve(port, port_a, &kubeconfig);
        let child = command
            .args(["--failure-policy", "fail"])
            .args(["--insecure-registry", &host])
            .spawn()
            .expect("start serve");
        (child, resolver)
    };
    // Both at once: one creates the Secret, the other uses the winner's.
    let (a, resolver_a) = replica(port_a);
    let (b, resolver_b) = replica(port_b);
    let _replicas = (a, b);
    for resolver in [resolver_a, resolver_b] {
        let ready = crate::e2e::wait_ready(&format!("http://127.0.0.1:{resolver}/readyz")).await;
        assert_eq!(
            ready["checks"]["webhook-registration"]["ready"], true,
            "{ready}"
        );
    }
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), "porch-system");
    let listed = secrets.list(&Default::default()).await.expect("list");
    let ours: Vec<_> = listed
        .items
        .iter()
        .filter(|s| s.metadata.name.as_deref() == Some(SECRET))
        .collect();
    assert_eq!(ours.len(), 1);
    let first = ours[0].clone();
    for k in ["tls.crt", "tls.key", "ca.crt", "ca.key"] {
        assert!(!key(&first, k).is_empty(), "{k}");
    }
    assert_eq!(
        first
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("app.kubernetes.io/managed-by"))
            .map(String::as_str),
        Some("fn-image-resolver")
    );
    let ca = key(&first, "ca.crt");
    let webhooks: Api<MutatingWebhookConfiguration> = Api::all(admin.clone());
    let registered = webhooks.get("fn-image-resolver").await.expect("registered");
    let bundle = registered
        .webhooks
        .as_ref()
        .and_then(|w| w[0].client_config.ca_bundle.clone());
    assert_eq!(
        bundle.map(|b| b.0),
        Some(ca.clone()),
        "the caBundle is the Secret's CA"
    );
    for port in [port_a, port_b] {
        assert_eq!(
            served_leaf(port, &ca).expect("served, trusted by the CA"),
            der(&key(&first, "tls.crt")),
            "replica on {port} serves the Secret's certificate"
        );
    }

    // Reviews through the API server all along, while the certificate is
    // renewed; failurePolicy Fail makes any failed call visible.
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "porch-fn-system");
    let failures = Arc::new(AtomicUsize::new(0));
    let created = Arc::new(AtomicUsize::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let load = {
        let (pods, failures, created, stop, host) = (
            pods.clone(),
            failures.clone(),
            created.clone(),
            stop.clone(),
            host.clone(),
        );
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let pod = function_pod(&host);
                match pods.create(&PostParams::default(), &pod).await {
                    Ok(p)
                        if p.spec.as_ref().is_some_and(|s| {
                            s.containers[0]
                                .image
                                .as_deref()
                                .is_some_and(|i| i.contains("@sha256:"))
                        }) =>
                    {
                        created.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => {
                        eprintln!("review failed: {e}");
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };

    // The renewal: one update of the Secret, then both replicas serve it.
    let started = Instant::now();
    let mut versions = vec![first.metadata.resource_version.clone()];
    let renewed = loop {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no renewal within 60 s"
        );
        let now = secrets.get(SECRET).await.expect("the Secret stays");
        if versions.last() != Some(&now.metadata.resource_version) {
            versions.push(now.metadata.resource_version.clone());
        }
        if key(&now, "tls.crt") != key(&first, "tls.crt") {
            let leaf = der(&key(&now, "tls.crt"));
            let a = served_leaf(port_a, &ca);
            let b = served_leaf(port_b, &ca);
            if a.as_ref() == Ok(&leaf) && b.as_ref() == Ok(&leaf) {
                break now;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        versions.len(),
        2,
        "exactly one renewal was written: {versions:?}"
    );
    assert_eq!(
        key(&renewed, "ca.crt"),
        ca,
        "the CA stays, so does the caBundle"
    );
    let registered = webhooks.get("fn-image-resolver").await.expect("registered");
    assert_eq!(
        registered
            .webhooks
            .as_ref()
            .and_then(|w| w[0].client_config.ca_bundle.clone())
            .map(|b| b.0),
        Some(ca)
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    load.await.expect("load");
    assert!(
        created.load(Ordering::SeqCst) > 10,
        "reviews went on through the renewal"
    );
    assert_eq!(failures.load(Ordering::SeqCst), 0, "no review failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_made_by_someone_else_is_used_and_never_written_and_unregister_cleans_up() {
    let (plane, admin) = porch_with_deploy().await;
    // cert-manager's kind of Secret: tls.crt, tls.key, ca.crt; no label of ours.
    let certs = crate::common::loopback_certs();
    let read = |f: &str| std::fs::read(certs.path().join(f)).expect("read");
    let theirs = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(SECRET.into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(
            [
                (
                    "tls.crt".to_string(),
                    k8s_openapi::ByteString(read("tls.crt")),
                ),
                (
                    "tls.key".to_string(),
                    k8s_openapi::ByteString(read("tls.key")),
                ),
                (
                    "ca.crt".to_string(),
                    k8s_openapi::ByteString(read("ca.crt")),
                ),
            ]
            .into(),
        ),
        ..Default::default()
    };
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), "porch-system");
    let theirs = secrets
        .create(&PostParams::default(), &theirs)
        .await
        .expect("create");
    let port = crate::common::free_port();
    let kubeconfig = plane.kubeconfig_as(SERVICE_ACCOUNT, &["system:serviceaccounts"]);
    let (mut command, resolver) = managed_serve(port, port, &kubeconfig);
    let serve = command.spawn().expect("start serve");
    crate::e2e::wait_ready(&format!("http://127.0.0.1:{resolver}/readyz")).await;
    assert_eq!(
        served_leaf(port, &read("ca.crt")).expect("served"),
        der(&read("tls.crt")),
        "their certificate is served"
    );
    let webhooks: Api<MutatingWebhookConfiguration> = Api::all(admin.clone());
    let registered = webhooks.get("fn-image-resolver").await.expect("registered");
    assert_eq!(
        registered
            .webhooks
            .as_ref()
            .and_then(|w| w[0].client_config.ca_bundle.clone())
            .map(|b| b.0),
        Some(read("ca.crt"))
    );
    // Past the short validity's renewal time: still theirs, untouched.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = secrets.get(SECRET).await.expect("still there");
    assert_eq!(
        after.metadata.resource_version,
        theirs.metadata.resource_version
    );
    drop(serve);

    // Uninstall: the webhook configuration goes; their Secret stays.
    let admin_kubeconfig = plane.kubeconfig(ADMIN_TOKEN, "admin");
    let unregister = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_fn-image-resolver"))
            .args(["unregister", &format!("--managed-tls-secret={SECRET}")])
            .env("KUBECONFIG", &admin_kubeconfig)
            .output()
            .expect("unregister")
    };
    let out = unregister();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("deleted MutatingWebhookConfiguration") && said.contains("left as it is"),
        "{said}"
    );
    assert!(
        webhooks
            .get_opt("fn-image-resolver")
            .await
            .expect("get")
            .is_none()
    );
    assert!(secrets.get_opt(SECRET).await.expect("get").is_some());
    // Ours is deleted; a second run finds nothing and still succeeds.
    secrets
        .delete(SECRET, &Default::default())
        .await
        .expect("delete theirs");
    let api = secrets.clone();
    fn_image_resolver::managed_tls::ensure(
        &api,
        &fn_image_resolver::managed_tls::ManagedTlsSettings {
            secret: SECRET.into(),
            namespace: "porch-system".into(),
            names: vec!["127.0.0.1".into()],
            validity: Duration::from_secs(3600),
        },
    )
    .await
    .expect("made by us");
    let out = unregister();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already gone"));
    assert!(
        secrets.get_opt(SECRET).await.expect("get").is_none(),
        "ours is deleted"
    );
}
