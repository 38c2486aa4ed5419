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
    let took = wait_for_secret_data(api, "auth-secret", want).await;
    let s = api.get("auth-secret").await.expect("get");
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

fn start_mirror(
    client: kube::Client,
    path: &std::path::Path,
    metrics: Arc<Metrics>,
) -> (Arc<MirrorStatus>, tokio_util::sync::CancellationToken) {
    let status = Arc::new(MirrorStatus::default());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let settings = MirrorSettings {
        source: path.to_path_buf(),
        name: "auth-secret".into(),
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
    let mut plane = ControlPlane::start();
    plane.create_namespace("porch-system").await;
    plane.create_namespace(NS).await;
    let admin = plane.admin().await;
    // Run as the deploy's ServiceAccount: its Role must be enough.
    let admin_kubeconfig = plane.kubeconfig(ADMIN_TOKEN, "admin");
    let out = std::process::Command::new("kubectl")
        .arg(format!("--kubeconfig={}", admin_kubeconfig.display()))
        .args([
            "apply",
            "-k",
            concat!(env!("CARGO_MANIFEST_DIR"), "/deploy"),
        ])
        .output()
        .expect("kubectl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sa = client_from(&plane.kubeconfig_as(SERVICE_ACCOUNT, &["system:serviceaccounts"])).await;

    // The mount as the kubelet lays it out: file -> ..data/file.
    let mount = tempfile::tempdir().expect("mount");
    kubelet_swap(mount.path(), &config("one"), 1);
    let path = mount.path().join(".dockerconfigjson");

    let metrics = Metrics::new();
    let (status, shutdown) = start_mirror(sa.clone(), &path, metrics.clone());
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), NS);

    // Missing -> created.
    wait_for(&secrets, &config("one")).await;
    assert!(status.is_synced());

    // Deleted -> recreated.
    secrets
        .delete("auth-secret", &DeleteParams::default())
        .await
        .expect("delete");
    let recreated = wait_for(&secrets, &config("one")).await;

    // Edited -> restored.
    let edit = json!({"data": {SECRET_KEY: base64_of(b"{\"auths\":{}}")}});
    secrets
        .patch("auth-secret", &PatchParams::default(), &Patch::Merge(&edit))
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
        .delete("auth-secret", &DeleteParams::default())
        .await
        .expect("delete after restart");
    wait_for(&secrets, &config("three")).await;

    // A second replica: both converge on one target and do not fight.
    let (_status2, shutdown2) = start_mirror(sa.clone(), &path, metrics.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = secrets
        .get("auth-secret")
        .await
        .expect("get")
        .metadata
        .resource_version;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = secrets
        .get("auth-secret")
        .await
        .expect("get")
        .metadata
        .resource_version;
    assert_eq!(before, after, "no writes while both replicas agree");
    kubelet_swap(mount.path(), &config("four"), 5);
    wait_for(&secrets, &config("four")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let settled = secrets
        .get("auth-secret")
        .await
        .expect("get")
        .metadata
        .resource_version;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        settled,
        secrets
            .get("auth-secret")
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
