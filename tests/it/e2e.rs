//! End to end through a real kube-apiserver: `serve` registers its webhook,
//! the API server calls it for function pods, the stored pods are pinned.

use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::common::k8s::{ADMIN_TOKEN, ControlPlane};
use crate::common::proxy::Fault;
use crate::resolve_auth::{PASSWORD, token_env};
use crate::{basic_auth, docker_config};

const BIN: &str = env!("CARGO_BIN_EXE_fn-image-resolver");
const SERVICE_ACCOUNT: &str = "system:serviceaccount:porch-system:fn-image-resolver";

/// The function pod Porch creates (its request as the webhook sees it,
/// before the API server's own admission adds what it adds), with both
/// images on `registry` unless said otherwise.
pub(crate) fn function_pod(registry: &str) -> Pod {
    function_pod_with_wrapper(registry, registry)
}

pub(crate) fn function_pod_with_wrapper(registry: &str, wrapper_registry: &str) -> Pod {
    let review: Value = serde_json::from_str(&crate::common::function_pod_review(
        registry,
        wrapper_registry,
    ))
    .expect("fixture");
    let mut pod: Pod = serde_json::from_value(review["request"]["object"].clone()).expect("pod");
    pod.metadata.namespace = None;
    // What the API server's ServiceAccount admission adds comes from the
    // real one in this test; Porch's request carries none of it.
    if let Some(spec) = pod.spec.as_mut() {
        spec.volumes
            .get_or_insert_default()
            .retain(|v| !v.name.starts_with("kube-api-access-"));
        for c in spec
            .containers
            .iter_mut()
            .chain(spec.init_containers.iter_mut().flatten())
        {
            c.volume_mounts
                .get_or_insert_default()
                .retain(|m| !m.name.starts_with("kube-api-access-"));
        }
        spec.service_account_name = None;
        spec.service_account = None;
        spec.tolerations = None;
        spec.priority = None;
        spec.enable_service_links = None;
        spec.preemption_policy = None;
    }
    pod
}

/// The fn-image-resolver counter `name` with `labels` in Prometheus text.
fn counter(metrics: &str, name: &str, labels: &str) -> u64 {
    let prefix = format!("fn_image_resolver_{name}{labels} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

struct Serve(tokio::process::Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

pub(crate) async fn wait_ready(url: &str) -> Value {
    let mut last = Value::Null;
    for _ in 0..300 {
        if let Ok(resp) = reqwest::get(url).await {
            let ok = resp.status().is_success();
            last = resp.json().await.unwrap_or(Value::Null);
            if ok {
                return last;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("not ready: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_stores_function_pods_pinned_through_the_registered_webhook() {
    let plane = ControlPlane::start();
    for ns in ["porch-fn-system", "porch-system", "other"] {
        plane.create_namespace(ns).await;
    }
    let admin = plane.admin().await;

    let env = token_env().await;
    let host = env.proxy.host.clone();
    // A registry the webhook has no credentials for (the kubelet might:
    // node credential providers, mirrors): it answers 401.
    let locked = crate::common::registry::Registry::start(
        None,
        crate::common::registry::Auth::Basic {
            user: "node".into(),
            pass: "node-only".into(),
        },
    );
    let (_cfg_dir, cfg) =
        docker_config(&json!({"auths": {host.clone(): {"auth": basic_auth("fn-user", PASSWORD)}}}));
    let certs = crate::common::loopback_certs();
    let port = crate::common::free_port();
    let resolver_port = crate::common::free_port();
    let metrics_url = format!("http://127.0.0.1:{resolver_port}/metrics");
    // serve runs as the deploy's ServiceAccount: registration, the secret
    // mirror and everything else must work with exactly that RBAC.
    apply_deploy(&plane);
    let kubeconfig = plane.kubeconfig_as(SERVICE_ACCOUNT, &["system:serviceaccounts"]);
    let insecure = format!("{host},127.0.0.1:{},{}", env.tokens.port, locked.host);
    let serve = |failure_policy: &str| {
        crate::serve_command(certs.path(), port, resolver_port)
            .arg("--register-webhook")
            .args(["--webhook-url", &format!("https://127.0.0.1:{port}/mutate")])
            .arg(format!(
                "--ca-bundle-file={}",
                certs.path().join("ca.crt").display()
            ))
            .args(["--failure-policy", failure_policy])
            .arg("--enable-private-registries=true")
            .arg(format!("--registry-auth-secret-path={}", cfg.display()))
            // Short, so the registry-failing step below is past it.
            .arg("--cache-tag-ttl=1s")
            .env("FN_IMAGE_RESOLVER_INSECURE_REGISTRY", &insecure)
            .env("KUBECONFIG", &kubeconfig)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start serve")
    };
    let running = Serve(serve("fail"));
    let ready = wait_ready(&format!("http://127.0.0.1:{resolver_port}/readyz")).await;
    assert_eq!(
        ready["checks"]["webhook-registration"]["ready"], true,
        "{ready}"
    );

    // A function pod exactly as Porch sends it, private registries on:
    // its own imagePullSecrets entry, the entrypoint already after `--`.
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "porch-fn-system");
    let mut porch_pod = function_pod(&host);
    porch_pod.spec.as_mut().expect("spec").image_pull_secrets =
        Some(vec![k8s_openapi::api::core::v1::LocalObjectReference {
            name: "auth-secret".into(),
        }]);
    let sent_args = porch_pod.spec.as_ref().expect("spec").containers[0]
        .args
        .clone();
    let created = pods
        .create(&PostParams::default(), &porch_pod)
        .await
        .expect("create pod");
    let name = created.metadata.name.clone().expect("generated name");
    let stored = pods.get(&name).await.expect("get pod");
    let spec = stored.spec.as_ref().expect("spec");
    let function = &spec.containers[0];
    assert_eq!(
        function.image.as_deref(),
        Some(
            format!(
                "{host}/fns/set-namespace:v0.4@{}",
                env.samples.entrypoint.digest
            )
            .as_str()
        )
    );
    assert_eq!(function.args, sent_args, "args stored as Porch wrote them");
    let init = &spec.init_containers.as_ref().expect("init")[0];
    assert_eq!(
        init.image.as_deref(),
        Some(
            format!(
                "{host}/nephio/porch-wrapper-server:v4@{}",
                env.samples.wrapper.digest
            )
            .as_str()
        )
    );
    assert!(
        spec.volumes
            .iter()
            .flatten()
            .any(|v| v.name.starts_with("kube-api-access-")),
        "the ServiceAccount admission ran: the webhook saw its projected volume"
    );
    assert_eq!(
        spec.image_pull_secrets
            .as_ref()
            .map(|s| s.iter().map(|r| r.name.clone()).collect::<Vec<_>>()),
        Some(vec!["auth-secret".to_string()]),
        "Porch's entry, not a second one"
    );
    assert!(stored.metadata.annotations.as_ref().is_some_and(|a| {
        a.contains_key(fn_image_resolver::admission::mutate::ORIGINAL_IMAGES_ANNOTATION)
    }));

    // A pod without the function label, in the function namespace: never
    // sent to the webhook (objectSelector), stored as written.
    let mut unlabeled = function_pod(&host);
    unlabeled.metadata.labels = Some([("app".to_string(), "not-a-function".to_string())].into());
    let unlabeled = pods
        .create(&PostParams::default(), &unlabeled)
        .await
        .expect("create");
    assert_eq!(
        unlabeled
            .spec
            .as_ref()
            .and_then(|s| s.containers[0].image.clone()),
        Some(format!("{host}/fns/set-namespace:v0.4"))
    );

    // Other namespaces are not sent to the webhook at all.
    let other: Api<Pod> = Api::namespaced(admin.clone(), "other");
    let untouched = other
        .create(&PostParams::default(), &function_pod(&host))
        .await
        .expect("create");
    assert_eq!(
        untouched
            .spec
            .as_ref()
            .and_then(|s| s.containers[0].image.clone()),
        Some(format!("{host}/fns/set-namespace:v0.4"))
    );

    // A wrapper-server image on a registry that refuses the webhook: the
    // pod is created (kubectl shows the warning), its function pinned.
    let manifest = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(
        manifest.path(),
        serde_json::to_vec(&function_pod_with_wrapper(&host, &locked.host)).expect("json"),
    )
    .expect("write");
    let out = std::process::Command::new("kubectl")
        .arg(format!(
            "--kubeconfig={}",
            plane.kubeconfig(ADMIN_TOKEN, "admin").display()
        ))
        .args([
            "create",
            "-n",
            "porch-fn-system",
            "-o",
            "jsonpath={.metadata.name}",
            "-f",
        ])
        .arg(manifest.path())
        .output()
        .expect("kubectl");
    let (created_name, shown) = (
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    assert!(out.status.success(), "{shown}");
    assert!(
        shown.contains("Warning:")
            && shown.contains("copy-wrapper-server")
            && shown.contains(&locked.host),
        "kubectl shows the warning: {shown}"
    );
    let wrapped = pods.get(&created_name).await.expect("stored");
    let spec = wrapped.spec.as_ref().expect("spec");
    assert_eq!(
        spec.init_containers.as_ref().expect("init")[0]
            .image
            .as_deref(),
        Some(format!("{}/nephio/porch-wrapper-server:v4", locked.host).as_str())
    );
    assert!(
        spec.containers[0]
            .image
            .as_deref()
            .is_some_and(|i| i.ends_with(&env.samples.entrypoint.digest)),
        "function pinned"
    );
    assert!(wrapped.metadata.annotations.as_ref().is_some_and(|a| {
        a.contains_key(fn_image_resolver::admission::mutate::UNPINNED_ANNOTATION)
    }));

    // UPDATEs are not sent to the webhook: its review counter stays put.
    let reviews = |text: &str| {
        ["patched", "unchanged", "denied", "failed-open", "invalid"]
            .iter()
            .map(|r| {
                counter(
                    text,
                    "admission_reviews_total",
                    &format!("{{result=\"{r}\"}}"),
                )
            })
            .sum::<u64>()
    };
    let before = reviews(&crate::metrics_text(&format!("http://127.0.0.1:{resolver_port}")).await);
    assert!(before >= 2, "the creations above were reviewed");
    let patch = json!({"metadata": {"labels": {"touched": "yes"}}});
    pods.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("update");
    let after = reviews(
        &reqwest::get(&metrics_url)
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text"),
    );
    assert_eq!(after, before, "no review for an UPDATE");

    // Registry failing, the tag's answer past its TTL: served stale, so new
    // pods are still pinned.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    env.proxy.set_fault(
        Fault::Status {
            code: 500,
            retry_after: None,
        },
        None,
    );
    let again = pods
        .create(&PostParams::default(), &function_pod(&host))
        .await
        .expect("create with registry down");
    assert_eq!(
        again
            .spec
            .as_ref()
            .and_then(|s| s.containers[0].image.clone()),
        function.image.clone()
    );
    let text = reqwest::get(&metrics_url)
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        counter(&text, "cache_lookups_total", "{result=\"stale\"}") >= 1,
        "served from a stale entry: {text}"
    );
    env.proxy.set_fault(Fault::None, None);

    // Webhook down with failurePolicy Fail: creation is refused.
    drop(running);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let err = pods
        .create(&PostParams::default(), &function_pod(&host))
        .await
        .expect_err("webhook down");
    let msg = err.to_string();
    assert!(
        msg.contains("failed calling webhook") && msg.contains("fn-image-resolver.porch.kpt.dev"),
        "{msg}"
    );

    // With Ignore the pod is stored unchanged.
    let status = tokio::process::Command::new(BIN)
        .args([
            "register",
            "--failure-policy",
            "ignore",
            "--webhook-url",
            &format!("https://127.0.0.1:{port}/mutate"),
        ])
        .arg(format!(
            "--ca-bundle-file={}",
            certs.path().join("ca.crt").display()
        ))
        .env("KUBECONFIG", &kubeconfig)
        .stderr(Stdio::null())
        .status()
        .await
        .expect("register");
    assert!(status.success());
    let ignored = pods
        .create(&PostParams::default(), &function_pod(&host))
        .await
        .expect("created unchanged");
    assert_eq!(
        ignored
            .spec
            .as_ref()
            .and_then(|s| s.containers[0].image.clone()),
        Some(format!("{host}/fns/set-namespace:v0.4"))
    );
}

/// A kustomization in a temporary directory: deploy/ plus one of its
/// components (kustomize wants both as relative paths).
fn deploy_with_component(component: &str) -> tempfile::TempDir {
    let overlay = tempfile::tempdir().expect("tempdir");
    let up = "../".repeat(overlay.path().components().count() - 1);
    let base = format!("{up}{}", env!("CARGO_MANIFEST_DIR").trim_start_matches('/'));
    std::fs::write(
        overlay.path().join("kustomization.yaml"),
        format!("resources: [{base}/deploy]\ncomponents: [{base}/deploy/components/{component}]\n"),
    )
    .expect("write");
    overlay
}

pub(crate) fn kubectl(kubeconfig: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("kubectl")
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args(args)
        .output()
        .expect("kubectl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `kubectl apply -k deploy/` as the cluster admin.
pub(crate) fn apply_deploy(plane: &ControlPlane) {
    let (ok, out) = kubectl(
        &plane.kubeconfig(ADMIN_TOKEN, "admin"),
        &[
            "apply",
            "-k",
            concat!(env!("CARGO_MANIFEST_DIR"), "/deploy"),
        ],
    );
    assert!(ok, "{out}");
}

/// `kubectl apply --dry-run=server -o yaml -k dir`: what the API server
/// would store, admission included.
fn server_dry_run(kubeconfig: &std::path::Path, dir: &std::path::Path) -> (bool, String) {
    kubectl(
        kubeconfig,
        &[
            "apply",
            "--dry-run=server",
            "-o",
            "yaml",
            "-k",
            &dir.display().to_string(),
        ],
    )
}

#[tokio::test]
async fn deploy_and_webhook_config_apply_and_the_rbac_is_least_privilege() {
    let plane = ControlPlane::start();
    plane.create_namespace("porch-system").await;
    plane.create_namespace("porch-fn-system").await;
    let admin = plane.kubeconfig(ADMIN_TOKEN, "admin");
    let root = env!("CARGO_MANIFEST_DIR");
    for dir in ["deploy", "webhook-config"] {
        let (ok, out) = server_dry_run(&admin, &std::path::Path::new(root).join(dir));
        assert!(ok, "{dir}: {out}");
    }
    let (ok, out) = kubectl(&admin, &["apply", "-k", &format!("{root}/deploy")]);
    assert!(ok, "{out}");

    // The sidecar component on a function-runner Deployment shaped like Porch's.
    let porch = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        porch.path().join("function-runner.yaml"),
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: function-runner\n  namespace: porch-system\nspec:\n  selector:\n    matchLabels: {app: function-runner}\n  template:\n    metadata:\n      labels: {app: function-runner}\n    spec:\n      containers:\n        - name: function-runner\n          image: example.com/porch-function-runner:v4\n          args: [--enable-private-registry=true]\n          volumeMounts:\n            - {name: docker-config, mountPath: /var/tmp/auth-secret, readOnly: true}\n      volumes:\n        - name: docker-config\n          secret: {secretName: registry-auth-secret}\n        - name: tls-registry-config\n          secret: {secretName: registry-tls-secret, optional: true}\n",
    )
    .expect("write");
    // kustomize wants a relative path to a component.
    let up = "../".repeat(porch.path().components().count() - 1);
    let component = format!(
        "{up}{}/deploy/components/function-runner-sidecar",
        root.trim_start_matches('/')
    );
    std::fs::write(
        porch.path().join("kustomization.yaml"),
        format!("resources: [function-runner.yaml]\ncomponents: [{component}]\n"),
    )
    .expect("write");
    let (ok, out) = kubectl(&admin, &["kustomize", &porch.path().display().to_string()]);
    assert!(
        ok && out.contains("--resolver-listen=127.0.0.1:9447")
            && out.contains("name: fn-image-resolver"),
        "{out}"
    );
    let (ok, out) = server_dry_run(&admin, porch.path());
    assert!(ok, "{out}");

    // The TokenReview component on top of deploy/.
    let overlay = deploy_with_component("resolver-token-review");
    let (ok, out) = server_dry_run(&admin, overlay.path());
    assert!(
        ok && out.contains("--resolver-token-review=true")
            && out.contains("name: fn-image-resolver-token-review"),
        "{out}"
    );

    // The node's registry host configuration, read-only through hostPath.
    let overlay = deploy_with_component("registry-hosts-from-node");
    let (ok, out) = server_dry_run(&admin, overlay.path());
    assert!(
        ok && out.contains("/etc/containerd/certs.d")
            && out.contains("FN_IMAGE_RESOLVER_REGISTRY_CONFIG_PATH"),
        "{out}"
    );

    // The mounted-certificate component: the same Deployment, files instead
    // of the managed Secret.
    let overlay = deploy_with_component("mounted-certs");
    let (ok, rendered) = kubectl(
        &admin,
        &["kustomize", &overlay.path().display().to_string()],
    );
    assert!(ok, "{rendered}");
    let (_, plain) = kubectl(&admin, &["kustomize", &format!("{root}/deploy")]);
    let args = |yaml: &str| -> Vec<String> {
        yaml.lines()
            .map(str::trim)
            .filter(|l| l.starts_with("- --") || *l == "- serve")
            .map(str::to_string)
            .collect()
    };
    let mut expected: Vec<String> = args(&plain)
        .into_iter()
        .flat_map(|a| {
            if a.contains("--managed-tls-secret") {
                vec![
                    "- --tls-cert-file=/var/run/fn-image-resolver/tls/tls.crt".to_string(),
                    "- --tls-key-file=/var/run/fn-image-resolver/tls/tls.key".to_string(),
                    "- --ca-bundle-file=/var/run/fn-image-resolver/ca/ca.crt".to_string(),
                ]
            } else {
                vec![a]
            }
        })
        .collect();
    let mut got = args(&rendered);
    expected.sort();
    got.sort();
    assert_eq!(
        got, expected,
        "the component keeps every other flag of deploy/"
    );
    let (ok, out) = server_dry_run(&admin, overlay.path());
    assert!(ok, "{out}");

    let sa = SERVICE_ACCOUNT;
    let can = |args: &[&str]| {
        let mut full = vec![
            "auth",
            "can-i",
            "--as",
            sa,
            "--as-group",
            "system:serviceaccounts",
        ];
        full.extend_from_slice(args);
        kubectl(&admin, &full)
            .1
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    for (args, want) in [
        (
            vec!["patch", "mutatingwebhookconfigurations/fn-image-resolver"],
            "yes",
        ),
        (
            vec!["get", "mutatingwebhookconfigurations/fn-image-resolver"],
            "yes",
        ),
        (vec!["create", "mutatingwebhookconfigurations"], "yes"),
        (
            vec!["patch", "mutatingwebhookconfigurations/someone-else"],
            "no",
        ),
        (
            vec!["delete", "mutatingwebhookconfigurations/fn-image-resolver"],
            "no",
        ),
        (
            vec![
                "get",
                "secrets/registry-auth-secret",
                "-n",
                "porch-fn-system",
            ],
            "yes",
        ),
        (
            vec![
                "patch",
                "secrets/registry-auth-secret",
                "-n",
                "porch-fn-system",
            ],
            "yes",
        ),
        (
            vec!["get", "secrets/auth-secret", "-n", "porch-fn-system"],
            "no",
        ),
        (vec!["create", "secrets", "-n", "porch-fn-system"], "yes"),
        (vec!["get", "secrets/other", "-n", "porch-fn-system"], "no"),
        (
            vec!["get", "secrets/registry-auth-secret", "-n", "porch-system"],
            "no",
        ),
        (vec!["create", "pods", "-n", "porch-fn-system"], "no"),
        (vec!["list", "secrets", "-n", "porch-fn-system"], "no"),
        // Warming the cache: the function pods, listed, nothing else.
        (vec!["list", "pods", "-n", "porch-fn-system"], "yes"),
        (vec!["list", "pods", "-n", "porch-system"], "no"),
        (vec!["get", "pods/x", "-n", "porch-fn-system"], "no"),
        // The managed serving certificate: that one Secret, plus create.
        (
            vec!["get", "secrets/fn-image-resolver-tls", "-n", "porch-system"],
            "yes",
        ),
        (
            vec![
                "update",
                "secrets/fn-image-resolver-tls",
                "-n",
                "porch-system",
            ],
            "yes",
        ),
        (
            vec![
                "delete",
                "secrets/fn-image-resolver-tls",
                "-n",
                "porch-system",
            ],
            "no",
        ),
        (vec!["create", "secrets", "-n", "porch-system"], "yes"),
        (vec!["get", "secrets/other", "-n", "porch-system"], "no"),
    ] {
        assert_eq!(can(&args), want, "can-i {args:?}");
    }

    // Registration with exactly that identity succeeds, twice (create, then update).
    let sa_kubeconfig = plane.kubeconfig_as(sa, &["system:serviceaccounts"]);
    for _ in 0..2 {
        let out = tokio::process::Command::new(BIN)
            .args(["register"])
            .env("KUBECONFIG", &sa_kubeconfig)
            .output()
            .await
            .expect("register");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (ok, out) = kubectl(
        &admin,
        &[
            "get",
            "mutatingwebhookconfiguration",
            "fn-image-resolver",
            "-o",
            "jsonpath={.webhooks[0].clientConfig.service.name}",
        ],
    );
    assert!(ok && out == "fn-image-resolver", "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_function_pods_already_running_are_warmed_before_ready() {
    let plane = ControlPlane::start();
    for ns in ["porch-fn-system", "porch-system"] {
        plane.create_namespace(ns).await;
    }
    apply_deploy(&plane);
    let env = crate::PlainEnv::start().await;
    let host = env.proxy.host.clone();
    // A function pod the webhook pinned earlier: its originals are recorded.
    let pods: Api<Pod> = Api::namespaced(plane.admin().await, "porch-fn-system");
    let mut pinned = function_pod(&host);
    let original = format!("{host}/fns/set-namespace:v0.4");
    pinned.spec.as_mut().expect("spec").containers[0].image =
        Some(format!("{original}@{}", env.samples.entrypoint.digest));
    pinned.metadata.annotations.get_or_insert_default().insert(
        fn_image_resolver::admission::mutate::ORIGINAL_IMAGES_ANNOTATION.into(),
        json!({"function": original}).to_string(),
    );
    pods.create(&PostParams::default(), &pinned)
        .await
        .expect("create");
    // And one without the label: not a function pod, not warmed.
    let mut other = function_pod(&host);
    other.metadata.labels = None;
    other.spec.as_mut().expect("spec").containers[0].image =
        Some(format!("{host}/fns/multi-arch:v1"));
    pods.create(&PostParams::default(), &other)
        .await
        .expect("create");

    let resolver_port = crate::common::free_port();
    let _serve = Serve(
        tokio::process::Command::new(BIN)
            .arg("serve")
            .args(["--resolver-listen", &format!("127.0.0.1:{resolver_port}")])
            .args(["--insecure-registry", &host])
            .env(
                "KUBECONFIG",
                plane.kubeconfig_as(SERVICE_ACCOUNT, &["system:serviceaccounts"]),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start serve"),
    );
    let base = format!("http://127.0.0.1:{resolver_port}");
    wait_ready(&format!("{base}/readyz")).await;
    let requests = env.proxy.total();
    let (status, answer) = crate::serve::get(&format!("{base}/v1/resolve?image={original}")).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["cached"], "hit",
        "the original image was warmed: {answer}"
    );
    assert_eq!(env.proxy.total(), requests);
    let (status, answer) =
        crate::serve::get(&format!("{base}/v1/resolve?image={host}/fns/multi-arch:v1")).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["cached"], "miss",
        "an unlabelled pod's image was not: {answer}"
    );
}

/// Copies directory `from` into `to` (a package, as `kpt pkg get` would).
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

#[tokio::test]
async fn kpt_live_apply_of_the_packages_applies_what_kubectl_apply_k_applies() {
    let plane = ControlPlane::start();
    for ns in ["porch-fn-system", "porch-system"] {
        plane.create_namespace(ns).await;
    }
    let admin = plane.kubeconfig(ADMIN_TOKEN, "admin");
    let kpt = |args: &[&str]| {
        let out = std::process::Command::new("kpt")
            .args(args)
            .env("KUBECONFIG", &admin)
            .output()
            .expect("kpt");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "kpt {args:?}: {text}");
        text
    };
    kpt(&["live", "install-resource-group"]);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let work = tempfile::tempdir().expect("tempdir");
    for package in ["deploy", "webhook-config"] {
        let dir = work.path().join(package);
        copy_dir(&root.join(package), &dir);
        let dir = dir.display().to_string();
        kpt(&[
            "live",
            "init",
            &dir,
            "--namespace",
            "porch-system",
            "--name",
            package,
        ]);
        // No kubelet runs here, so the Deployment never becomes ready: wait
        // a moment for reconciliation, then judge the apply by its result.
        let out = std::process::Command::new("kpt")
            .args(["live", "apply", &dir, "--reconcile-timeout=3s"])
            .env("KUBECONFIG", &admin)
            .output()
            .expect("kpt");
        let said = String::from_utf8_lossy(&out.stdout).to_string();
        let applied = said
            .lines()
            .find(|l| l.starts_with("apply result:"))
            .unwrap_or_default();
        assert!(
            applied.contains(" 0 failed") && !applied.contains(" 0 successful"),
            "{package}: {said}{}",
            String::from_utf8_lossy(&out.stderr)
        );

        // Nothing kubectl apply -k would change, but for kpt's own
        // bookkeeping (its inventory annotation, which kubectl would drop).
        let (_, out) = kubectl(
            &admin,
            &["diff", "-k", &root.join(package).display().to_string()],
        );
        let changed: Vec<&str> = out
            .lines()
            .filter(|l| {
                (l.starts_with('+') || l.starts_with('-'))
                    && !l.starts_with("+++")
                    && !l.starts_with("---")
            })
            .filter(|l| !l.contains("config.k8s.io/owning-inventory") && !l.contains("generation:"))
            .collect();
        assert!(
            changed.is_empty(),
            "{package}: kpt applied something else than kubectl apply -k would:\n{out}"
        );
        // ...and nothing more: the inventory is exactly the kustomization's objects.
        let (ok, rendered) = kubectl(
            &admin,
            &["kustomize", &root.join(package).display().to_string()],
        );
        assert!(ok, "{rendered}");
        let mut want: Vec<String> = rendered
            .split("\n---\n")
            .map(|doc| {
                let doc: Value = serde_saphyr::from_str(doc).expect("yaml");
                format!(
                    "{}/{}",
                    doc["kind"].as_str().unwrap_or_default(),
                    doc["metadata"]["name"].as_str().unwrap_or_default()
                )
            })
            .collect();
        let (ok, inventory) = kubectl(
            &admin,
            &[
                "get",
                "resourcegroups.kpt.dev",
                package,
                "-n",
                "porch-system",
                "-o",
                "json",
            ],
        );
        assert!(ok, "{inventory}");
        let inventory: Value = serde_json::from_str(&inventory).expect("json");
        let mut got: Vec<String> = inventory["spec"]["resources"]
            .as_array()
            .expect("resources")
            .iter()
            .map(|r| {
                format!(
                    "{}/{}",
                    r["kind"].as_str().unwrap_or_default(),
                    r["name"].as_str().unwrap_or_default()
                )
            })
            .collect();
        want.sort();
        got.sort();
        assert_eq!(got, want, "{package}");
    }
}

/// deploy/settings.yaml names the mirrored pull secret once and kustomize
/// copies it into the Deployment and the Role; `kpt live apply` applies the
/// files as they are, so they must already say the same.
#[test]
fn the_deploy_files_say_what_settings_yaml_and_kustomize_say() {
    let root = env!("CARGO_MANIFEST_DIR");
    let settings: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(format!("{root}/deploy/settings.yaml")).expect("settings"),
    )
    .expect("settings yaml");
    let name = settings["data"]["registry-auth-secret-name"]
        .as_str()
        .expect("the name")
        .to_string();
    let out = std::process::Command::new("kubectl")
        .args(["kustomize", &format!("{root}/deploy")])
        .output()
        .expect("kubectl kustomize");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let built = String::from_utf8_lossy(&out.stdout).into_owned();
    let files = ["deployment.yaml", "rbac.yaml"]
        .iter()
        .map(|f| std::fs::read_to_string(format!("{root}/deploy/{f}")).expect("file"))
        .collect::<Vec<_>>()
        .join("\n---\n");
    for (what, text) in [("kustomize's output", &built), ("the files", &files)] {
        let docs: Vec<Value> = text
            .split("\n---\n")
            .filter(|d| d.contains("kind:"))
            .map(|d| serde_saphyr::from_str(d).expect("yaml"))
            .collect();
        let role = docs
            .iter()
            .find(|d| {
                d["metadata"]["name"] == "fn-image-resolver-pull-secret" && d["kind"] == "Role"
            })
            .expect("the pull-secret Role");
        assert_eq!(role["rules"][0]["resourceNames"], json!([name]), "{what}");
        let deployment = docs
            .iter()
            .find(|d| d["kind"] == "Deployment")
            .expect("the Deployment");
        let env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .expect("env");
        assert!(
            env.iter().any(
                |e| e["name"] == "FN_IMAGE_RESOLVER_REGISTRY_AUTH_SECRET_NAME"
                    && e["value"] == name.as_str()
            ),
            "{what}: {env:?}"
        );
    }
    assert!(
        !built.contains("fn-image-resolver-settings"),
        "settings.yaml is not applied"
    );
}
