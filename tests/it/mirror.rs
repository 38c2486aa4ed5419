//! The pull-secret mirror against a real kube-apiserver.

use std::sync::Arc;
use std::time::Duration;

use fn_image_resolver::metrics::Metrics;
use fn_image_resolver::secrets::{
    MANAGED_BY, MANAGED_BY_LABEL, MirrorSettings, MirrorStatus, SECRET_KEY, SECRET_TYPE,
};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;

use crate::common::k8s::{
    ADMIN_TOKEN, ControlPlane, client_from, kubelet_swap, wait_for_secret_data,
};

const SERVICE_ACCOUNT: &str = "system:serviceaccount:porch-system:fn-image-resolver";

const NS: &str = "porch-fn-system";

async fn wait_for(api: &Api<Secret>, want: &[u8]) -> Duration {
    let took = wait_for_secret_data(api, "registry-auth-secret", want).await;
    let s = api.get("registry-auth-secret").await.expect("get");
    assert_eq!(s.type_.as_deref(), Some(SECRET_TYPE));
    assert_eq!(
        s.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(MANAGED_BY_LABEL))
            .map(String::as_str),
        Some(MANAGED_BY)
    );
    took
}

fn config(password: &str) -> Vec<u8> {
    serde_json::to_vec(
        &json!({"auths": {"registry.example.com": {"username": "u", "password": password}}}),
    )
    .expect("json")
}

/// A control plane with `deploy/` applied; returns an admin client and one
/// acting as the deploy's ServiceAccount (its Role must be enough).
async fn plane_with_deploy() -> (ControlPlane, kube::Client, kube::Client) {
    let plane = ControlPlane::start();
    plane.create_namespace("porch-system").await;
    plane.create_namespace(NS).await;
    let admin = plane.admin().await;
    let (ok, out) = crate::e2e::kubectl(
        &plane.kubeconfig(ADMIN_TOKEN, "admin"),
        &[
            "apply",
            "-k",
            concat!(env!("CARGO_MANIFEST_DIR"), "/deploy"),
        ],
    );
    assert!(ok, "{out}");
    let sa = client_from(&plane.kubeconfig_as(SERVICE_ACCOUNT, &["system:serviceaccounts"])).await;
    (plane, admin, sa)
}

/// A mirror running as `sa` from a kubelet-style mount holding
/// `config("one")`, and the target Secret as the admin sees it.
struct Mirrored {
    mount: tempfile::TempDir,
    path: std::path::PathBuf,
    metrics: Arc<Metrics>,
    status: Arc<MirrorStatus>,
    shutdown: tokio_util::sync::CancellationToken,
    secrets: Api<Secret>,
}

async fn mirrored(sa: &kube::Client, admin: &kube::Client) -> Mirrored {
    // The mount as the kubelet lays it out: file -> ..data/file.
    let mount = tempfile::tempdir().expect("mount");
    kubelet_swap(mount.path(), &config("one"), 1);
    let path = mount.path().join(".dockerconfigjson");
    let metrics = Metrics::new();
    let (status, shutdown) = start_mirror(sa.clone(), &path, metrics.clone());
    Mirrored {
        mount,
        path,
        metrics,
        status,
        shutdown,
        secrets: Api::namespaced(admin.clone(), NS),
    }
}

fn start_mirror(
    client: kube::Client,
    path: &std::path::Path,
    metrics: Arc<Metrics>,
) -> (Arc<MirrorStatus>, tokio_util::sync::CancellationToken) {
    let status = Arc::new(MirrorStatus::default());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let settings = MirrorSettings {
        source: path.to_path_buf(),
        name: "registry-auth-secret".into(),
        namespace: NS.into(),
        resync: Duration::from_secs(60),
    };
    tokio::spawn(fn_image_resolver::secrets::run(
        client,
        settings,
        status.clone(),
        metrics,
        None,
        shutdown.clone(),
    ));
    (status, shutdown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mirror_creates_restores_follows_and_survives_the_api_server() {
    let (mut plane, admin, sa) = plane_with_deploy().await;

    let Mirrored {
        mount,
        path,
        metrics,
        status,
        shutdown,
        secrets,
    } = mirrored(&sa, &admin).await;

    // Missing -> created.
    wait_for(&secrets, &config("one")).await;
    assert!(status.is_synced());

    // Deleted -> recreated.
    secrets
        .delete("registry-auth-secret", &DeleteParams::default())
        .await
        .expect("delete");
    let recreated = wait_for(&secrets, &config("one")).await;

    // Edited -> restored.
    let edit = json!({"data": {SECRET_KEY: base64_of(b"{\"auths\":{}}")}});
    secrets
        .patch(
            "registry-auth-secret",
            &PatchParams::default(),
            &Patch::Merge(&edit),
        )
        .await
        .expect("edit");
    wait_for(&secrets, &config("one")).await;

    // Source swapped the kubelet's way -> target updated.
    kubelet_swap(mount.path(), &config("two"), 2);
    let followed = wait_for(&secrets, &config("two")).await;

    // Garbage source -> target untouched, error visible.
    kubelet_swap(mount.path(), b"{ this is not json", 3);
    tokio::time::sleep(Duration::from_millis(800)).await;
    wait_for(&secrets, &config("two")).await;
    assert!(
        metrics
            .encode()
            .contains("fn_image_resolver_secret_syncs_total{result=\"invalid-source\"}")
    );

    // API server restarted mid-run: the mirror resumes by itself.
    kubelet_swap(mount.path(), &config("three"), 4);
    plane.stop_apiserver();
    tokio::time::sleep(Duration::from_millis(500)).await;
    plane.restart_apiserver();
    wait_for(&secrets, &config("three")).await;
    let admin = plane.admin().await;
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), NS);
    secrets
        .delete("registry-auth-secret", &DeleteParams::default())
        .await
        .expect("delete after restart");
    wait_for(&secrets, &config("three")).await;

    // A second replica: both converge on one target and do not fight.
    let (_status2, shutdown2) = start_mirror(sa.clone(), &path, metrics.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = secrets
        .get("registry-auth-secret")
        .await
        .expect("get")
        .metadata
        .resource_version;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = secrets
        .get("registry-auth-secret")
        .await
        .expect("get")
        .metadata
        .resource_version;
    assert_eq!(before, after, "no writes while both replicas agree");
    kubelet_swap(mount.path(), &config("four"), 5);
    wait_for(&secrets, &config("four")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let settled = secrets
        .get("registry-auth-secret")
        .await
        .expect("get")
        .metadata
        .resource_version;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        settled,
        secrets
            .get("registry-auth-secret")
            .await
            .expect("get")
            .metadata
            .resource_version
    );

    shutdown.cancel();
    shutdown2.cancel();
    eprintln!("recreated after delete in {recreated:?}, followed a source swap in {followed:?}");
    assert!(
        metrics
            .encode()
            .contains("fn_image_resolver_secret_propagation_seconds_count")
    );
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A validating webhook that refuses the next `refusals` writes of Secrets
/// with 409 Conflict (the API server passes the code on to the writer), and
/// counts every review it sees.
#[derive(Debug, Default)]
struct Conflicts {
    refusals: std::sync::atomic::AtomicUsize,
    refused: std::sync::atomic::AtomicUsize,
    reviews: std::sync::atomic::AtomicUsize,
}

async fn conflict_webhook(conflicts: Arc<Conflicts>) -> (u16, String, tempfile::TempDir) {
    use std::sync::atomic::Ordering;
    let certs = crate::common::loopback_certs();
    let cert = fn_image_resolver::server::tls::ReloadingCert::load(
        certs.path().join("tls.crt"),
        certs.path().join("tls.key"),
    )
    .expect("cert");
    let app = axum::Router::new().route(
        "/validate",
        axum::routing::post(move |axum::Json(review): axum::Json<serde_json::Value>| {
            let conflicts = conflicts.clone();
            async move {
                conflicts.reviews.fetch_add(1, Ordering::SeqCst);
                let uid = review["request"]["uid"].clone();
                let refuse = conflicts
                    .refusals
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                let response = if refuse {
                    conflicts.refused.fetch_add(1, Ordering::SeqCst);
                    json!({"uid": uid, "allowed": false, "status": {
                        "code": 409, "reason": "Conflict", "message": "simulated write conflict"}})
                } else {
                    json!({"uid": uid, "allowed": true})
                };
                axum::Json(json!({
                    "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                    "response": response
                }))
            }
        }),
    );
    let listener = fn_image_resolver::server::Listener::bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let port = listener.local_addr().port();
    tokio::spawn(fn_image_resolver::server::serve_tls(
        listener,
        app,
        cert,
        fn_image_resolver::server::HttpLimits::default(),
        tokio_util::sync::CancellationToken::new(),
    ));
    let ca = std::fs::read_to_string(certs.path().join("ca.crt")).expect("ca");
    (port, ca, certs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mirror_rides_out_409_conflicts_and_never_leaves_the_target_invalid() {
    use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
    use std::sync::atomic::Ordering;

    let (_plane, admin, sa) = plane_with_deploy().await;

    let conflicts = Arc::new(Conflicts::default());
    let (port, ca, _certs) = conflict_webhook(conflicts.clone()).await;
    let config_json = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": "conflicts"},
        "webhooks": [{
            "name": "conflicts.test.example.com",
            "clientConfig": {"url": format!("https://127.0.0.1:{port}/validate"), "caBundle": base64_of(ca.as_bytes())},
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"], "resources": ["secrets"]}],
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": NS}},
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 5
        }]
    });
    let webhook: ValidatingWebhookConfiguration =
        serde_json::from_value(config_json).expect("webhook config");
    Api::<ValidatingWebhookConfiguration>::all(admin.clone())
        .create(&Default::default(), &webhook)
        .await
        .expect("register the conflict webhook");

    let Mirrored {
        mount,
        metrics,
        status,
        shutdown,
        secrets,
        ..
    } = mirrored(&sa, &admin).await;
    wait_for(&secrets, &config("one")).await;
    // The API server picks up webhook configurations asynchronously: wait
    // until it consults ours (a dry-run write, allowed) before arming it.
    let probe = json!({"metadata": {"annotations": {"probe": "1"}}});
    for _ in 0..100 {
        let _ = secrets
            .patch(
                "registry-auth-secret",
                &PatchParams::default().dry_run(),
                &Patch::Merge(&probe),
            )
            .await;
        if conflicts.reviews.load(Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        conflicts.reviews.load(Ordering::SeqCst) > 0,
        "the webhook is in use"
    );

    // What a refused writer gets from the API server really is a 409.
    conflicts.refusals.store(1, Ordering::SeqCst);
    let refused = secrets
        .patch(
            "registry-auth-secret",
            &PatchParams::default().dry_run(),
            &Patch::Merge(&probe),
        )
        .await
        .expect_err("refused");
    assert!(
        matches!(&refused, kube::Error::Api(status) if status.code == 409),
        "{refused:?}"
    );
    conflicts.refused.store(0, Ordering::SeqCst);

    // The next three writes are refused with 409; meanwhile the source moves.
    conflicts.refusals.store(3, Ordering::SeqCst);
    kubelet_swap(mount.path(), &config("two"), 2);
    let watch_target = {
        let secrets = secrets.clone();
        tokio::spawn(async move {
            // Every read while the conflicts last: valid, managed, one of
            // the two configs, never empty.
            let mut reads = 0;
            for _ in 0..200 {
                let s = secrets
                    .get("registry-auth-secret")
                    .await
                    .expect("the target exists throughout");
                let data = s
                    .data
                    .as_ref()
                    .and_then(|d| d.get(SECRET_KEY))
                    .map(|b| b.0.clone())
                    .unwrap_or_default();
                assert!(
                    data == config("one") || data == config("two"),
                    "target held {:?}",
                    String::from_utf8_lossy(&data)
                );
                reads += 1;
                if data == config("two") {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            reads
        })
    };
    wait_for(&secrets, &config("two")).await;
    let reads = watch_target.await.expect("reads");
    assert!(reads > 0);
    assert_eq!(
        conflicts.refused.load(Ordering::SeqCst),
        3,
        "the mirror's writes were refused three times before one went through"
    );
    assert!(status.is_synced());
    let text = metrics.encode();
    assert!(
        text.lines().any(|l| l
            .starts_with("fn_image_resolver_secret_syncs_total{result=\"error\"}")
            && !l.ends_with(" 0")),
        "{text}"
    );
    shutdown.cancel();
}

/// What Porch's function runner does with the same Secret
/// (`InspectOrCreateSecret`): Get; Create from the mounted file's bytes when
/// missing; otherwise put the file's bytes in and Update. Porch skips the
/// Update when the bytes are equal; this writer always sends it, which is
/// harder on the mirror.
async fn porch_writes(api: &Api<Secret>, source: &std::path::Path) {
    let bytes = std::fs::read(source).expect("read the mounted config");
    match api.get_opt("registry-auth-secret").await.expect("get") {
        None => {
            let secret = Secret {
                metadata: kube::api::ObjectMeta {
                    name: Some("registry-auth-secret".into()),
                    ..Default::default()
                },
                type_: Some(SECRET_TYPE.into()),
                data: Some([(SECRET_KEY.to_string(), k8s_openapi::ByteString(bytes))].into()),
                ..Default::default()
            };
            // The mirror may have won the race: then there is nothing to create.
            let _ = api.create(&Default::default(), &secret).await;
        }
        Some(mut secret) => {
            secret
                .data
                .get_or_insert_default()
                .insert(SECRET_KEY.to_string(), k8s_openapi::ByteString(bytes));
            // A conflict means the mirror wrote in between: Porch retries later.
            let _ = api
                .replace("registry-auth-secret", &Default::default(), &secret)
                .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mirror_and_porchs_own_writer_of_the_secret_agree() {
    let (_plane, admin, sa) = plane_with_deploy().await;
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), NS);
    // Both read the same mounted file, written by hand: its bytes are not
    // what a JSON serializer would make of it, so only an exact copy agrees.
    let mount = tempfile::tempdir().expect("mount");
    let bytes = b"{\n  \"auths\": {\"registry.example.com\": {\"auth\": \"dTpw\"}}\n}\n";
    kubelet_swap(mount.path(), bytes, 1);
    let path = mount.path().join(".dockerconfigjson");

    // Porch runs first and creates the Secret without our label.
    porch_writes(&secrets, &path).await;
    let created = secrets
        .get("registry-auth-secret")
        .await
        .expect("created by Porch");

    // A mirror whose own source is unusable never writes: what it reports
    // to the webhook (the Secret exists) comes from its watch.
    let broken = tempfile::tempdir().expect("broken mount");
    std::fs::write(broken.path().join("config.json"), "not json").expect("write");
    let (blind, stop_blind) = start_mirror(
        sa.clone(),
        &broken.path().join("config.json"),
        Metrics::new(),
    );
    for _ in 0..200 {
        if blind.secret_exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(blind.secret_exists(), "the Secret Porch wrote counts");
    assert!(!blind.is_synced());
    stop_blind.cancel();

    let (status, shutdown) = start_mirror(sa.clone(), &path, Metrics::new());
    let porch = {
        let (secrets, path) = (secrets.clone(), path.clone());
        tokio::spawn(async move {
            for _ in 0..10 {
                porch_writes(&secrets, &path).await;
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
        })
    };
    let mut versions = vec![created.metadata.resource_version.clone()];
    let mut reads = 0;
    while !porch.is_finished() {
        let s = secrets
            .get("registry-auth-secret")
            .await
            .expect("never missing");
        let data = s
            .data
            .as_ref()
            .and_then(|d| d.get(SECRET_KEY))
            .map(|b| b.0.as_slice())
            .unwrap_or_default();
        assert_eq!(data, bytes, "never empty, never another rendering");
        if versions.last() != Some(&s.metadata.resource_version) {
            versions.push(s.metadata.resource_version.clone());
        }
        reads += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    porch.await.expect("porch writer");
    assert!(reads > 100, "{reads} reads in 30 s");
    assert!(
        versions.len() <= 2,
        "the resourceVersion changed more than once (the mirror's label): {versions:?}"
    );
    assert!(status.is_synced() && status.secret_exists());
    shutdown.cancel();
}

/// The mirror with readiness, from a mount holding `config("one")`.
fn start_mirror_with_readiness(
    client: kube::Client,
    mount: &tempfile::TempDir,
    metrics: Arc<Metrics>,
) -> (
    Arc<fn_image_resolver::health::Readiness>,
    tokio_util::sync::CancellationToken,
) {
    kubelet_swap(mount.path(), &config("one"), 1);
    let readiness = Arc::new(fn_image_resolver::health::Readiness::default());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let settings = MirrorSettings {
        source: mount.path().join(".dockerconfigjson"),
        name: "registry-auth-secret".into(),
        namespace: NS.into(),
        resync: Duration::from_secs(60),
    };
    tokio::spawn(fn_image_resolver::secrets::run(
        client,
        settings,
        Arc::new(MirrorStatus::default()),
        metrics,
        Some(readiness.clone()),
        shutdown.clone(),
    ));
    (readiness, shutdown)
}

/// Waits until the pull-secret check is degraded; its reason.
async fn degraded_reason(readiness: &fn_image_resolver::health::Readiness, name: &str) -> String {
    use fn_image_resolver::health::Check;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        match readiness.get(fn_image_resolver::secrets::READINESS_CHECK) {
            Some(Check::Degraded(reason)) => return reason,
            other => assert!(
                std::time::Instant::now() < deadline,
                "{name}: never degraded: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A mirror that can never write stays a reason in /readyz, a metric and
/// an alert, never a replica out of service: for a Secret of that name of
/// another type, an immutable one holding other bytes, and a policy that
/// refuses our label.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_that_cannot_write_leaves_the_replica_ready_with_the_reason() {
    let (plane, admin, sa) = plane_with_deploy().await;
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), NS);
    let admin_kubeconfig = plane.kubeconfig(ADMIN_TOKEN, "admin");
    let apply = |yaml: &str| {
        let path = plane.dir.path().join("policy.yaml");
        std::fs::write(&path, yaml).expect("write");
        let (ok, out) = crate::e2e::kubectl(
            &admin_kubeconfig,
            &["apply", "-f", &path.display().to_string()],
        );
        assert!(ok, "{out}");
    };
    let case = |name: &'static str| {
        let sa = sa.clone();
        async move {
            let mount = tempfile::tempdir().expect("mount");
            let metrics = Metrics::new();
            let (readiness, shutdown) =
                start_mirror_with_readiness(sa.clone(), &mount, metrics.clone());
            let reason = degraded_reason(&readiness, name).await;
            assert!(readiness.snapshot().0, "{name}: still ready");
            let errors = metrics.encode();
            assert!(
                errors.contains("fn_image_resolver_secret_syncs_total{result=\"error\"}"),
                "{name}: {errors}"
            );
            shutdown.cancel();
            reason
        }
    };

    // 1. A Secret of that name of another type: the type cannot change.
    apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: registry-auth-secret, namespace: {NS}}}\ntype: Opaque\nstringData: {{note: other}}\n"
    ));
    let reason = case("another type").await;
    assert!(reason.contains("registry-auth-secret"), "{reason}");
    secrets
        .delete("registry-auth-secret", &DeleteParams::default())
        .await
        .expect("delete");

    // 2. An immutable Secret of the right type with other bytes.
    apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: registry-auth-secret, namespace: {NS}}}\ntype: kubernetes.io/dockerconfigjson\nimmutable: true\nstringData:\n  .dockerconfigjson: '{{\"auths\": {{}}}}'\n"
    ));
    let reason = case("immutable").await;
    assert!(reason.contains("registry-auth-secret"), "{reason}");
    secrets
        .delete("registry-auth-secret", &DeleteParams::default())
        .await
        .expect("delete");

    // 3. A ValidatingAdmissionPolicy refusing Secrets with our label.
    apply(&format!(
        "apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {{name: no-fn-image-resolver-secrets}}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
      - {{apiGroups: [\"\"], apiVersions: [v1], operations: [CREATE, UPDATE], resources: [secrets]}}
  validations:
    - expression: \"!has(object.metadata.labels) || !('{MANAGED_BY_LABEL}' in object.metadata.labels)\"
      message: Secrets here may not carry that label
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {{name: no-fn-image-resolver-secrets}}
spec:
  policyName: no-fn-image-resolver-secrets
  validationActions: [Deny]
  matchResources:
    namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {NS}}}}}
"
    ));
    // The policy is in force once a labelled Secret is refused.
    let probe: Secret = serde_json::from_value(json!({
        "metadata": {"name": "probe", "labels": {MANAGED_BY_LABEL: MANAGED_BY}},
    }))
    .expect("probe");
    let dry_run = kube::api::PostParams {
        dry_run: true,
        ..Default::default()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while secrets.create(&dry_run, &probe).await.is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the policy never applied"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A mirror of an earlier case may have put the Secret back while it
    // stopped: gone before this one starts.
    let _ = secrets
        .delete("registry-auth-secret", &DeleteParams::default())
        .await;
    let reason = case("policy").await;
    assert!(reason.contains("may not carry that label"), "{reason}");
}
