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
            ca_validity: fn_image_resolver::certs::CA_LIFETIME,
            registered_webhook: None,
        },
        &mut Default::default(),
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

/// A JSON patch of the Secret as an admin (another tool, a person).
async fn patch_secret(secrets: &Api<Secret>, patch: serde_json::Value) {
    let patch: json_patch::Patch = serde_json::from_value(patch).expect("json patch");
    secrets
        .patch(
            SECRET,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::<()>::Json(patch),
        )
        .await
        .expect("patch the Secret");
}

/// The Secret's resourceVersions over `window`, sampled every 100 ms.
async fn versions_during(secrets: &Api<Secret>, window: Duration) -> Vec<Option<String>> {
    let mut versions = Vec::new();
    let until = Instant::now() + window;
    while Instant::now() < until {
        let now = secrets
            .get_opt(SECRET)
            .await
            .expect("get")
            .and_then(|s| s.metadata.resource_version);
        if versions.last() != Some(&now) {
            versions.push(now);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    versions
}

/// cert-manager's kind of Secret, from a fresh loopback CA: no label of ours.
fn foreign_secret() -> (Secret, tempfile::TempDir) {
    let certs = crate::common::loopback_certs();
    let read =
        |f: &str| k8s_openapi::ByteString(std::fs::read(certs.path().join(f)).expect("read"));
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(SECRET.into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(
            [
                ("tls.crt".to_string(), read("tls.crt")),
                ("tls.key".to_string(), read("tls.key")),
                ("ca.crt".to_string(), read("ca.crt")),
            ]
            .into(),
        ),
        ..Default::default()
    };
    (secret, certs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_secret_that_is_deleted_is_waited_for_never_made_by_us() {
    let (plane, admin) = porch_with_deploy().await;
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), "porch-system");
    let (theirs, certs) = foreign_secret();
    secrets
        .create(&PostParams::default(), &theirs)
        .await
        .expect("create");
    let ca = std::fs::read(certs.path().join("ca.crt")).expect("ca");
    let leaf = der(&std::fs::read(certs.path().join("tls.crt")).expect("leaf"));
    let port = crate::common::free_port();
    let kubeconfig = plane.kubeconfig_as(SERVICE_ACCOUNT, &["system:serviceaccounts"]);
    let (mut command, resolver) = managed_serve(port, port, &kubeconfig);
    let _serve = command.spawn().expect("start serve");
    crate::e2e::wait_ready(&format!("http://127.0.0.1:{resolver}/readyz")).await;
    assert_eq!(served_leaf(port, &ca).expect("served"), leaf);

    // cert-manager (or GitOps) deletes it: the replica does not step in.
    secrets
        .delete(SECRET, &Default::default())
        .await
        .expect("delete");
    let versions = versions_during(&secrets, Duration::from_secs(4)).await;
    assert_eq!(versions, vec![None], "no Secret of ours in the gap");
    assert_eq!(
        served_leaf(port, &ca).expect("still served"),
        leaf,
        "the served certificate does not flip"
    );
    let ready = crate::e2e::wait_ready(&format!("http://127.0.0.1:{resolver}/readyz")).await;
    let check = &ready["checks"]["serving-certificate"];
    assert_eq!(check["state"], "degraded", "{ready}");
    assert!(
        check["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("waiting for its owner"),
        "{ready}"
    );

    // Its owner makes it again: served, never written by us.
    let (again, certs) = foreign_secret();
    let made = secrets
        .create(&PostParams::default(), &again)
        .await
        .expect("recreate");
    let ca = std::fs::read(certs.path().join("ca.crt")).expect("ca");
    let leaf = der(&std::fs::read(certs.path().join("tls.crt")).expect("leaf"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while served_leaf(port, &ca).ok().as_ref() != Some(&leaf) {
        assert!(
            Instant::now() < deadline,
            "the owner's new certificate is served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let versions = versions_during(&secrets, Duration::from_secs(3)).await;
    assert_eq!(
        versions,
        vec![made.metadata.resource_version],
        "no write of ours"
    );
    let ready = crate::e2e::wait_ready(&format!("http://127.0.0.1:{resolver}/readyz")).await;
    assert_eq!(
        ready["checks"]["serving-certificate"]["state"], "ready",
        "{ready}"
    );
}

/// The Prometheus count of writes of the managed Secret, all reasons.
async fn certificate_writes(resolver: u16) -> u64 {
    let text = crate::metrics_text(&format!("http://127.0.0.1:{resolver}")).await;
    text.lines()
        .filter(|l| l.starts_with("fn_image_resolver_serving_certificate_writes_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_have_a_brake_and_two_versions_share_one_certificate() {
    let (plane, admin) = porch_with_deploy().await;
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), "porch-system");
    let kubeconfig = plane.kubeconfig_as(SERVICE_ACCOUNT, &["system:serviceaccounts"]);
    // A URL whose host the url crate prints as [::ffff:7f00:1] and the
    // certificate reads back as ::ffff:127.0.0.1.
    let (port_a, port_b) = (crate::common::free_port(), crate::common::free_port());
    let replica = |port: u16, url_host: &str| {
        let resolver = crate::common::free_port();
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_fn-image-resolver"));
        command
            .arg("serve")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--resolver-listen", &format!("127.0.0.1:{resolver}")])
            .arg(format!("--managed-tls-secret={SECRET}"))
            .arg("--managed-tls-validity=60s")
            .args([
                "--webhook-url",
                &format!("https://{url_host}:{port}/mutate"),
            ])
            .env("KUBECONFIG", &kubeconfig)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        (command.spawn().expect("start serve"), resolver)
    };
    let (_a, resolver_a) = replica(port_a, "[::ffff:127.0.0.1]");
    crate::e2e::wait_ready(&format!("http://127.0.0.1:{resolver_a}/readyz")).await;
    let versions = versions_during(&secrets, Duration::from_secs(6)).await;
    assert_eq!(
        versions.len(),
        1,
        "created once, then left alone: {versions:?}"
    );
    assert_eq!(certificate_writes(resolver_a).await, 1);

    // Another version of the replica wants another name: it renews once
    // with both names, and neither renews again.
    let (_b, resolver_b) = replica(port_b, "127.0.0.2");
    crate::e2e::wait_ready(&format!("http://127.0.0.1:{resolver_b}/readyz")).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let versions = versions_during(&secrets, Duration::from_secs(8)).await;
    assert_eq!(versions.len(), 1, "no flapping: {versions:?}");
    assert_eq!(
        certificate_writes(resolver_a).await + certificate_writes(resolver_b).await,
        2,
        "one create, one renewal with both names"
    );
    let secret = secrets.get(SECRET).await.expect("secret");
    let leaf = key(&secret, "tls.crt");
    for name in ["::ffff:127.0.0.1", "127.0.0.2"] {
        assert!(
            fn_image_resolver::managed_tls::renewal_due(&leaf, &[name.to_string()]).is_some(),
            "the certificate names {name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_ca_key_rolls_over_to_a_new_ca_without_a_failed_review() {
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
    let (a, resolver_a) = replica(port_a);
    let (b, resolver_b) = replica(port_b);
    let _replicas = (a, b);
    for resolver in [resolver_a, resolver_b] {
        crate::e2e::wait_ready(&format!("http://127.0.0.1:{resolver}/readyz")).await;
    }
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), "porch-system");
    let first = secrets.get(SECRET).await.expect("made");
    let old_ca = key(&first, "ca.crt");

    // Reviews through the API server all along (failurePolicy Fail).
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "porch-fn-system");
    let failures = Arc::new(AtomicUsize::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let load = {
        let (pods, failures, stop, host) =
            (pods.clone(), failures.clone(), stop.clone(), host.clone());
        tokio::spawn(async move {
            let mut created = 0;
            while !stop.is_cancelled() {
                if let Err(e) = pods
                    .create(&PostParams::default(), &function_pod(&host))
                    .await
                {
                    eprintln!("review failed: {e}");
                    failures.fetch_add(1, Ordering::SeqCst);
                }
                created += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            created
        })
    };

    // Another tool's metadata, and the CA's key lost.
    patch_secret(
        &secrets,
        serde_json::json!([
            {"op": "add", "path": "/metadata/labels/other.tool~1owner", "value": "x"},
            {"op": "add", "path": "/metadata/annotations", "value": {"other.tool/note": "y"}},
            {"op": "add", "path": "/metadata/finalizers", "value": ["example.com/keep"]},
            {"op": "remove", "path": "/data/ca.key"},
        ]),
    )
    .await;

    // First the new CA beside the old one, the old CA's leaf still served;
    // then the new CA's leaf, served by both replicas; later the old CA goes.
    let webhooks: Api<MutatingWebhookConfiguration> = Api::all(admin.clone());
    let started = Instant::now();
    let mut saw_both_with_old_leaf = false;
    let new_ca = loop {
        assert!(started.elapsed() < Duration::from_secs(60), "no rollover");
        let now = secrets.get(SECRET).await.expect("secret");
        let cas = key(&now, "ca.crt");
        let n = rustls_pki_types::CertificateDer::pem_slice_iter(&cas).count();
        if n == 2 && key(&now, "tls.crt") == key(&first, "tls.crt") {
            saw_both_with_old_leaf = true;
        }
        if key(&now, "tls.crt") != key(&first, "tls.crt") {
            assert!(
                saw_both_with_old_leaf,
                "the new CA was trusted before its leaf"
            );
            let registered = webhooks.get("fn-image-resolver").await.expect("registered");
            let bundle = registered.webhooks.as_ref().expect("webhooks")[0]
                .client_config
                .ca_bundle
                .clone()
                .expect("caBundle")
                .0;
            assert_eq!(
                bundle, cas,
                "both CAs registered while the new leaf is served"
            );
            break cas;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let leaf = der(&key(&secrets.get(SECRET).await.expect("secret"), "tls.crt"));
    let deadline = Instant::now() + Duration::from_secs(10);
    for port in [port_a, port_b] {
        while served_leaf(port, &new_ca).ok().as_ref() != Some(&leaf) {
            assert!(Instant::now() < deadline, "{port} serves the new CA's leaf");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // The old CA's last leaf was valid for 30 s: after that, one CA again.
    let deadline = Instant::now() + Duration::from_secs(60);
    let settled = loop {
        let now = secrets.get(SECRET).await.expect("secret");
        let cas = key(&now, "ca.crt");
        if rustls_pki_types::CertificateDer::pem_slice_iter(&cas).count() == 1 {
            break now;
        }
        assert!(Instant::now() < deadline, "the old CA was never retired");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_ne!(key(&settled, "ca.crt"), old_ca);
    let meta = &settled.metadata;
    assert_eq!(
        meta.labels.as_ref().expect("labels")["other.tool/owner"],
        "x"
    );
    assert_eq!(
        meta.annotations.as_ref().expect("annotations")["other.tool/note"],
        "y"
    );
    assert_eq!(meta.finalizers, Some(vec!["example.com/keep".to_string()]));
    stop.cancel();
    let created = load.await.expect("load");
    assert!(
        created > 20,
        "reviews went on through the rollover: {created}"
    );
    assert_eq!(failures.load(Ordering::SeqCst), 0, "no review failed");
    patch_secret(
        &secrets,
        serde_json::json!([{"op": "remove", "path": "/metadata/finalizers"}]),
    )
    .await;
}

#[tokio::test]
async fn sigterm_while_waiting_for_the_managed_certificate_exits_cleanly() {
    // An API server that is not there: start-up waits for the certificate.
    let dir = tempfile::tempdir().expect("tempdir");
    let port = crate::common::free_port();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!("apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: 'https://127.0.0.1:{port}', insecure-skip-tls-verify: true}}\nusers:\n- name: u\n  user: {{token: t}}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u}}\ncurrent-context: c\n"),
    )
    .expect("kubeconfig");
    let (mut command, _) = managed_serve(crate::common::free_port(), port, &kubeconfig);
    let mut child = command.spawn().expect("start serve");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = child.id().expect("pid");
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("exits at once")
        .expect("status");
    assert_eq!(status.code(), Some(0), "{status}");
}
