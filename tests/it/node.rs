//! On a real node (tests/cluster: kubelet, containerd, runc, kube-proxy,
//! CoreDNS): the project's own image, built by scripts/build-image.sh,
//! installed the way an operator installs it, admitting Porch function
//! pods that then pull and run; a rollout under load; the sidecar
//! component; the uninstall.
//!
//! Each test runs inside the cluster's network namespace
//! ([`cluster::enter`]), one at a time.

use std::collections::BTreeSet;
use std::io::Read as _;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::{Value, json};

use crate::common::cluster::{self, apply, enter, kubectl, kubectl_ok, wait_for};
use crate::common::oci::{self, File, Image, Pusher};
use crate::common::registry::{Auth, Registry};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const BIN: &str = env!("CARGO_BIN_EXE_fn-image-resolver");
const PORCH_NS: &str = "porch-system";
const FN_NS: &str = "porch-fn-system";
const USER: &str = "porch";
const PASS: &str = "node-test-PASSWORD";
/// What the function image's entrypoint says, so the pod's log shows that
/// the entrypoint the webhook wrote after `--` is the one that ran.
const MESSAGE: &str = "entrypoint-from-the-pinned-image";

/// Enters the cluster (see [`cluster::enter`]) after filling, outside it,
/// the caches scripts/build-image.sh needs (there is no route out inside).
pub(crate) fn enter_with_image_caches(test: &str) -> bool {
    if !cluster::inside() {
        let status = Command::new(format!("{REPO}/scripts/build-image.sh"))
            .arg("--fetch")
            .status()
            .expect("run scripts/build-image.sh --fetch");
        assert!(status.success(), "scripts/build-image.sh --fetch failed");
    }
    enter(test)
}

/// Builds the project's image with scripts/build-image.sh and pushes it to
/// the cluster's registry; its pinned reference.
pub(crate) fn project_image() -> String {
    let reference = format!("{}/fn-image-resolver:test", cluster::cluster().registry);
    let out = Command::new(format!("{REPO}/scripts/build-image.sh"))
        .args(["--insecure", &reference])
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/build-image.sh");
    assert!(out.status.success(), "scripts/build-image.sh failed");
    let pinned = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string();
    assert!(
        pinned.contains("@sha256:"),
        "build-image.sh printed {pinned:?}"
    );
    pinned
}

/// GETs `url` over plain HTTP from the cluster's registry.
async fn registry_get(url: &str, accept: &str) -> Vec<u8> {
    let resp = reqwest::Client::new()
        .get(url)
        .header("Accept", accept)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert!(resp.status().is_success(), "GET {url}: {}", resp.status());
    resp.bytes().await.expect("body").to_vec()
}

/// What the Dockerfile says the image is.
#[derive(Debug, Default)]
struct DockerfileImage {
    user: String,
    entrypoint: Value,
    cmd: Value,
    env: BTreeSet<String>,
    binary: String,
}

fn read_dockerfile() -> DockerfileImage {
    let text = std::fs::read_to_string(format!("{REPO}/Dockerfile")).expect("Dockerfile");
    let mut image = DockerfileImage::default();
    // Only the final stage describes the image.
    let last_stage = text
        .rsplit_once("\nFROM ")
        .map(|(_, stage)| stage)
        .expect("a multi-stage Dockerfile");
    for line in last_stage.lines().map(str::trim) {
        let (instruction, rest) = line.split_once(' ').unwrap_or((line, ""));
        match instruction {
            "USER" => image.user = rest.trim().to_string(),
            "ENTRYPOINT" => image.entrypoint = serde_json::from_str(rest).expect("exec form"),
            "CMD" => image.cmd = serde_json::from_str(rest).expect("exec form"),
            "ENV" => {
                for pair in rest.split_whitespace() {
                    image.env.insert(pair.to_string());
                }
            }
            "COPY" if rest.contains("target/release/fn-image-resolver") => {
                image.binary = rest
                    .split_whitespace()
                    .last()
                    .expect("COPY destination")
                    .to_string();
            }
            _ => {}
        }
    }
    image
}

#[tokio::test]
async fn the_image_is_what_the_dockerfile_describes_and_holds_only_what_it_runs() {
    if !enter_with_image_caches(
        "node::the_image_is_what_the_dockerfile_describes_and_holds_only_what_it_runs",
    ) {
        return;
    }
    let pinned = project_image();
    let (repo_tag, digest) = pinned.split_once('@').expect("pinned");
    let (host_repo, _tag) = repo_tag.rsplit_once(':').expect("tag");
    let (host, repo) = host_repo.split_once('/').expect("host/repo");
    let manifest: Value = serde_json::from_slice(
        &registry_get(
            &format!("http://{host}/v2/{repo}/manifests/{digest}"),
            oci::OCI_MANIFEST,
        )
        .await,
    )
    .expect("manifest json");
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .expect("config digest");
    let config: Value = serde_json::from_slice(
        &registry_get(
            &format!("http://{host}/v2/{repo}/blobs/{config_digest}"),
            "*/*",
        )
        .await,
    )
    .expect("config json");
    let dockerfile = read_dockerfile();
    assert_eq!(config["os"], "linux");
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(
        config["config"]["User"],
        dockerfile.user.as_str(),
        "{config}"
    );
    assert_eq!(
        config["config"]["Entrypoint"], dockerfile.entrypoint,
        "{config}"
    );
    assert_eq!(config["config"]["Cmd"], dockerfile.cmd, "{config}");
    let env: BTreeSet<String> = config["config"]["Env"]
        .as_array()
        .expect("Env")
        .iter()
        .map(|e| e.as_str().expect("env string").to_string())
        .collect();
    assert_eq!(env, dockerfile.env, "{config}");
    let labels = &config["config"]["Labels"];
    for label in ["source", "revision", "version"] {
        let value = labels[format!("org.opencontainers.image.{label}")]
            .as_str()
            .unwrap_or_default();
        assert!(!value.is_empty(), "label {label} missing: {labels}");
    }
    assert_eq!(
        labels["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );

    // Exactly the runtime files: the binary, the loader and the libraries
    // it names, the CA bundle; no shell, no package manager.
    let layers = manifest["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1, "{manifest}");
    let blob = registry_get(
        &format!(
            "http://{host}/v2/{repo}/blobs/{}",
            layers[0]["digest"].as_str().expect("layer digest")
        ),
        "*/*",
    )
    .await;
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(blob.as_slice())
        .read_to_end(&mut tar)
        .expect("gunzip");
    let mut files = BTreeSet::new();
    for entry in tar::Archive::new(tar.as_slice()).entries().expect("tar") {
        let entry = entry.expect("tar entry");
        if entry.header().entry_type().is_file() {
            files.insert(format!("/{}", entry.path().expect("path").display()).replace("/./", "/"));
        }
    }
    let want: BTreeSet<String> = [
        dockerfile.binary.as_str(),
        "/lib64/ld-linux-x86-64.so.2",
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/lib/x86_64-linux-gnu/libgcc_s.so.1",
        "/etc/ssl/certs/ca-certificates.crt",
    ]
    .into_iter()
    .map(str::to_string)
    .collect();
    assert_eq!(files, want, "the image's files");
}

/// The images of a Porch function pod: the function (its entrypoint prints
/// [`MESSAGE`]) and a stand-in of Porch's wrapper-server image.
pub(crate) struct FunctionImages {
    pub function: Image,
    pub wrapper: Image,
}

pub(crate) fn function_images() -> FunctionImages {
    let bin = std::fs::read(cluster::testbin()).expect("testbin");
    FunctionImages {
        function: oci::runnable_image(
            &[File::new("usr/local/bin/function", &bin, 0o755)],
            json!({
                "Entrypoint": ["/usr/local/bin/function", "--message", MESSAGE],
                "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
            }),
        ),
        // Porch's init container runs `cp -a /home/nonroot/wrapper-server/.
        // /wrapper-server-tools`; its function container then runs the
        // copied wrapper-server and probes it with grpc-health-probe.
        wrapper: oci::runnable_image(
            &[
                File::new("bin/cp", &bin, 0o755),
                File::new("home/nonroot/wrapper-server/wrapper-server", &bin, 0o755),
                File::new("home/nonroot/wrapper-server/grpc-health-probe", &bin, 0o755),
            ],
            json!({"Env": ["PATH=/bin"]}),
        ),
    }
}

pub(crate) async fn push_function_images(pusher: &Pusher, images: &FunctionImages) {
    pusher
        .image("fns/set-namespace", "v0.4", &images.function)
        .await;
    pusher
        .image("nephio/porch-wrapper-server", "v4", &images.wrapper)
        .await;
}

/// The TLS + htpasswd registry of the tests, on the node's address, which
/// the node trusts through containerd's hosts.toml (CA only: credentials
/// come from pull secrets). Returns it and its CA.
fn private_registry() -> (Registry, String) {
    let c = cluster::cluster();
    let ca =
        fn_image_resolver::certs::CertificateAuthority::generate("node-test-registry").expect("ca");
    let issued = ca.issue(std::slice::from_ref(&c.node_ip)).expect("issue");
    let registry = Registry::start_at(
        &c.node_ip,
        crate::common::free_port(),
        Some(&issued),
        Auth::Basic {
            user: USER.into(),
            pass: PASS.into(),
        },
        None,
    );
    let ca_pem = ca.cert_pem();
    cluster::trust_registry(&registry.host, Some(&ca_pem));
    (registry, ca_pem)
}

fn dockerconfigjson(host: &str) -> String {
    json!({"auths": {host: {"auth": crate::basic_auth(USER, PASS)}}}).to_string()
}

/// A Porch function pod as the function runner makes it, with its images
/// in `registry` (function) and `wrapper_registry` (wrapper-server), and
/// the entrypoint Porch cached for an older digest after `--`.
fn porch_pod(registry: &str, wrapper_registry: &str) -> Pod {
    crate::e2e::function_pod_with_wrapper(registry, wrapper_registry)
}

fn images_of(pod: &Pod) -> Vec<String> {
    let spec = pod.spec.as_ref().expect("spec");
    spec.init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .map(|c| c.image.clone().unwrap_or_default())
        .collect()
}

fn pull_secrets_of(pod: &Pod) -> Vec<String> {
    pod.spec
        .as_ref()
        .and_then(|s| s.image_pull_secrets.as_ref())
        .into_iter()
        .flatten()
        .map(|r| r.name.clone())
        .collect()
}

fn function_args(pod: &Pod) -> Vec<String> {
    pod.spec.as_ref().expect("spec").containers[0]
        .args
        .clone()
        .unwrap_or_default()
}

/// The pod's phase and whether it is Ready.
fn pod_state(namespace: &str, name: &str) -> (String, bool, String) {
    let (ok, out) = kubectl(&["-n", namespace, "get", "pod", name, "-o", "json"]);
    if !ok {
        return (String::new(), false, out);
    }
    let pod: Value = serde_json::from_str(&out).expect("pod json");
    let phase = pod["status"]["phase"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let ready = pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True");
    let waiting: Vec<String> = pod["status"]["initContainerStatuses"]
        .as_array()
        .into_iter()
        .chain(pod["status"]["containerStatuses"].as_array())
        .flatten()
        .filter_map(|s| s["state"]["waiting"]["reason"].as_str().map(str::to_string))
        .collect();
    (phase, ready, waiting.join(","))
}

pub(crate) fn wait_running_and_ready(namespace: &str, name: &str) {
    wait_for(
        &format!("pod {namespace}/{name} Running and Ready"),
        Duration::from_secs(120),
        || {
            let (phase, ready, waiting) = pod_state(namespace, name);
            assert!(
                !waiting.contains("ErrImagePull") && !waiting.contains("ImagePullBackOff"),
                "{namespace}/{name} cannot pull its images: {waiting}\n{}",
                kubectl(&["-n", namespace, "describe", "pod", name]).1
            );
            (phase == "Running" && ready).then_some(())
        },
    );
}

/// The webhook replicas' pods.
fn webhook_pods() -> Vec<(String, String)> {
    let out = kubectl_ok(&[
        "-n",
        PORCH_NS,
        "get",
        "pods",
        "-l",
        "app=fn-image-resolver",
        "-o",
        "jsonpath={range .items[*]}{.metadata.name} {.status.podIP} {.metadata.deletionTimestamp}{\"\\n\"}{end}",
    ]);
    out.lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let (name, ip) = (parts.next()?, parts.next()?);
            // Pods on their way out are not the Deployment's replicas.
            parts
                .next()
                .is_none()
                .then(|| (name.to_string(), ip.to_string()))
        })
        .collect()
}

/// A replica's `/readyz`: the HTTP status and the JSON body.
fn readyz(pod_ip: &str) -> (u16, Value) {
    let out = Command::new("curl")
        .args(["-sk", "--max-time", "3", "-w", "\n%{http_code}"])
        .arg(format!("https://{pod_ip}:8443/readyz"))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (
        code.trim().parse().unwrap_or(0),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

/// The operator's kustomization over deploy/: only the image, and plain
/// HTTP allowed for the cluster's registry (where that image is).
pub(crate) fn operator_kustomization(image: &str) -> tempfile::TempDir {
    operator_kustomization_with(image, "", "")
}

/// The same with more `patches` entries and more top-level text.
pub(crate) fn operator_kustomization_with(
    image: &str,
    patches: &str,
    more: &str,
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = "../".repeat(dir.path().components().count() - 1);
    let (name, digest) = image.split_once('@').expect("pinned image");
    let name = name.rsplit_once(':').map_or(name, |(n, _)| n);
    let registry = &cluster::cluster().registry;
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        format!(
            "resources: [{up}{}/deploy]
images:
  - name: ghcr.io/kptdev/fn-image-resolver
    newName: {name}
    digest: {digest}
patches:
  - target: {{kind: Deployment, name: fn-image-resolver}}
    patch: |
      - op: add
        path: /spec/template/spec/containers/0/args/-
        value: --insecure-registry={registry}
{patches}{more}",
            REPO.trim_start_matches('/')
        ),
    )
    .expect("kustomization");
    dir
}

/// Porch's namespaces, fresh: whatever an earlier test installed is gone.
pub(crate) fn reset_porch() {
    let _ = kubectl(&[
        "delete",
        "mutatingwebhookconfiguration",
        "fn-image-resolver",
        "--ignore-not-found",
    ]);
    delete_namespaces(&[PORCH_NS, FN_NS]);
    porch_namespaces();
}

/// Waits until the API server reaches the webhook through its Service (a
/// dry run of `pod` comes back with the webhook's annotations): the
/// replicas can be Ready a moment before kube-proxy routes the Service to
/// them, and meanwhile `failurePolicy: Ignore` admits pods as written.
pub(crate) async fn wait_until_the_webhook_answers(pods: &Api<Pod>, pod: &Pod) {
    use fn_image_resolver::admission::mutate::{ORIGINAL_IMAGES_ANNOTATION, UNPINNED_ANNOTATION};
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(would) = pods.create(&dry_run, pod).await {
            let annotations = would.metadata.annotations.unwrap_or_default();
            if annotations.contains_key(ORIGINAL_IMAGES_ANNOTATION)
                || annotations.contains_key(UNPINNED_ANNOTATION)
            {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the webhook never answered through its Service"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub(crate) fn rollout_status(timeout: &str) {
    kubectl_ok(&[
        "-n",
        PORCH_NS,
        "rollout",
        "status",
        "deployment/fn-image-resolver",
        &format!("--timeout={timeout}"),
    ]);
}

/// Porch's namespaces, as Porch's own install makes them (the
/// controller-manager adds their `default` ServiceAccounts).
pub(crate) fn porch_namespaces() {
    apply(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {PORCH_NS}}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {FN_NS}}}\n"
    ));
    for ns in [PORCH_NS, FN_NS] {
        wait_for(
            &format!("ServiceAccount {ns}/default"),
            Duration::from_secs(30),
            || {
                kubectl(&["-n", ns, "get", "serviceaccount", "default"])
                    .0
                    .then_some(())
            },
        );
    }
}

pub(crate) fn delete_namespaces(names: &[&str]) {
    for ns in names {
        let _ = kubectl(&[
            "delete",
            "namespace",
            ns,
            "--ignore-not-found",
            "--wait=true",
            "--timeout=120s",
        ]);
    }
}

/// Creates `pod` in `namespace` through the API server; the stored object.
async fn create_pod(api: &Api<Pod>, pod: &Pod) -> Result<Pod, kube::Error> {
    api.create(&PostParams::default(), pod).await
}

fn is_pinned(image: &str) -> bool {
    image.contains("@sha256:")
}

#[tokio::test]
async fn operator_install_pins_function_pods_that_run_survives_a_rollout_and_uninstalls_clean() {
    if !enter_with_image_caches(
        "node::operator_install_pins_function_pods_that_run_survives_a_rollout_and_uninstalls_clean",
    ) {
        return;
    }
    let c = cluster::cluster();
    delete_namespaces(&["fnir-control"]);
    reset_porch();
    let image = project_image();

    // --- The install: no pull-secret source, no registry CA Secret (a
    // Porch without private registries).
    let overlay = operator_kustomization(&image);
    kubectl_ok(&["apply", "-k", &overlay.path().display().to_string()]);
    rollout_status("240s");
    let replicas = webhook_pods();
    assert_eq!(replicas.len(), 2, "{replicas:?}");
    let hook: Value = serde_json::from_str(&kubectl_ok(&[
        "get",
        "mutatingwebhookconfiguration",
        "fn-image-resolver",
        "-o",
        "json",
    ]))
    .expect("webhook configuration");
    let client_config = &hook["webhooks"][0]["clientConfig"];
    assert_eq!(
        client_config["service"]["name"], "fn-image-resolver",
        "{hook}"
    );
    assert_eq!(client_config["service"]["namespace"], PORCH_NS, "{hook}");
    assert!(client_config["url"].is_null(), "{hook}");
    for (name, ip) in &replicas {
        let (status, body) = readyz(ip);
        assert_eq!(status, 200, "{name}: {body}");
        let check = &body["checks"]["private-registries"];
        assert_eq!(check["state"], "degraded", "{name}: {body}");
        let reason = check["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("private registries are off until the file appears")
                && reason.contains("verified with the system roots until it appears"),
            "{name}: {body}"
        );
        let logs = kubectl_ok(&["-n", PORCH_NS, "logs", name]);
        assert!(
            logs.contains("private registries are off until the file appears"),
            "{name} logs:\n{logs}"
        );
    }

    // It pins what it can reach: images on the cluster's plain registry.
    let images = function_images();
    let open = Pusher::new(format!("http://{}", c.registry), reqwest::Client::new());
    push_function_images(&open, &images).await;
    let client = cluster::client().await;
    let fn_pods: Api<Pod> = Api::namespaced(client.clone(), FN_NS);
    wait_until_the_webhook_answers(&fn_pods, &porch_pod(&c.registry, &c.registry)).await;
    let stored = create_pod(&fn_pods, &porch_pod(&c.registry, &c.registry))
        .await
        .expect("create a function pod");
    let stored_images = images_of(&stored);
    assert!(
        stored_images.iter().all(|i| is_pinned(i)),
        "{stored_images:?}"
    );
    assert!(
        pull_secrets_of(&stored).is_empty(),
        "no credentials, no pull secret"
    );
    let name = stored.metadata.name.clone().expect("name");
    wait_running_and_ready(FN_NS, &name);
    the_documented_check_shows_pinned_images(&c.registry);

    // --- Private registries appear: Porch's guide makes the source Secret
    // (and here a registry CA Secret); the replicas take both up without a
    // restart and mirror the pull secret.
    let (private, ca_pem) = private_registry();
    let pusher = Pusher::new(private.url(), crate::client_trusting(&ca_pem)).basic(USER, PASS);
    push_function_images(&pusher, &images).await;
    let auth = dockerconfigjson(&private.host);
    apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: registry-auth-secret, namespace: {PORCH_NS}}}\ntype: kubernetes.io/dockerconfigjson\nstringData:\n  .dockerconfigjson: '{auth}'\n---\napiVersion: v1\nkind: Secret\nmetadata: {{name: registry-tls-secret, namespace: {PORCH_NS}}}\nstringData:\n  ca.crt: |\n{}\n",
        ca_pem
            .lines()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    ));
    for (name, ip) in &replicas {
        wait_for(
            &format!("{name} to take up the Docker config and the CA"),
            Duration::from_secs(150),
            || {
                let (status, body) = readyz(ip);
                (status == 200
                    && body["checks"]["private-registries"]["state"] == "ready"
                    && body["checks"]["pull-secret"]["state"] == "ready")
                    .then_some(())
            },
        );
    }
    let restarts = kubectl_ok(&[
        "-n",
        PORCH_NS,
        "get",
        "pods",
        "-l",
        "app=fn-image-resolver",
        "-o",
        "jsonpath={.items[*].status.containerStatuses[0].restartCount}",
    ]);
    assert!(
        restarts.split_whitespace().all(|n| n == "0"),
        "no restart: {restarts}"
    );
    let mirrored: Value = serde_json::from_str(&kubectl_ok(&[
        "-n",
        FN_NS,
        "get",
        "secret",
        "registry-auth-secret",
        "-o",
        "json",
    ]))
    .expect("mirrored secret");
    assert_eq!(
        mirrored["metadata"]["annotations"]["fn-image-resolver.kpt.dev/created"],
        "true"
    );

    // --- A function pod whose both images are private. First the control:
    // the pod as the API server would store it (a dry run through the
    // webhook), in a namespace without the Secret, cannot pull its images
    // (first, while the node has none of them: they are IfNotPresent).
    let pod = porch_pod(&private.host, &private.host);
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let would_store = fn_pods.create(&dry_run, &pod).await.expect("dry run");
    apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: fnir-control}\n");
    wait_for(
        "ServiceAccount fnir-control/default",
        Duration::from_secs(30),
        || {
            kubectl(&["-n", "fnir-control", "get", "serviceaccount", "default"])
                .0
                .then_some(())
        },
    );
    let mut control = would_store.clone();
    control.metadata = kube::api::ObjectMeta {
        name: Some("control".into()),
        ..Default::default()
    };
    control.status = None;
    if let Some(spec) = control.spec.as_mut() {
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
    }
    let control_pods: Api<Pod> = Api::namespaced(client.clone(), "fnir-control");
    create_pod(&control_pods, &control)
        .await
        .expect("control pod");
    wait_for(
        "the control pod to fail pulling its images",
        Duration::from_secs(90),
        || {
            let (_, _, waiting) = pod_state("fnir-control", "control");
            (waiting.contains("ErrImagePull") || waiting.contains("ImagePullBackOff")).then_some(())
        },
    );
    delete_namespaces(&["fnir-control"]);

    // The same pod in porch-fn-system: stored pinned with the mirrored
    // Secret, pulled by the kubelet with it, running the entrypoint the
    // webhook wrote after `--`.
    let stored = create_pod(&fn_pods, &pod)
        .await
        .expect("create a private function pod");
    assert_eq!(images_of(&stored), images_of(&would_store));
    let stored_images = images_of(&stored);
    assert!(
        stored_images.iter().all(|i| is_pinned(i)),
        "{stored_images:?}"
    );
    assert_eq!(pull_secrets_of(&stored), ["registry-auth-secret"]);
    let args = function_args(&stored);
    let after_dashes = &args[args.iter().position(|a| a == "--").expect("--") + 1..];
    assert_eq!(
        after_dashes,
        ["/usr/local/bin/function", "--message", MESSAGE],
        "{args:?}"
    );
    let name = stored.metadata.name.clone().expect("name");
    wait_running_and_ready(FN_NS, &name);
    let log = kubectl_ok(&["-n", FN_NS, "logs", &name, "-c", "function"]);
    assert!(
        log.contains(&format!(
            "fn-image-resolver test function ran: --message {MESSAGE}"
        )),
        "function log:\n{log}"
    );

    // --- A rollout that refuses nothing: Porch-shaped pods created without
    // pause through `kubectl rollout restart` of the Deployment as shipped.
    let counts = rollout_under_load(&fn_pods, &private.host).await;
    println!(
        "rollout under load: {} pods created, {} stored pinned, {} admitted unpinned, {} refused",
        counts.created, counts.pinned, counts.unpinned, counts.refused
    );
    assert!(
        counts.created >= 120,
        "at least 2 per second for 60 s: {counts:?}"
    );
    assert_eq!(counts.refused, 0, "{counts:?}: {:?}", counts.errors);
    assert_eq!(counts.unpinned, 0, "{counts:?}");
    assert_eq!(counts.pinned, counts.created, "{counts:?}");

    // --- Uninstall: the Deployment and the rest of deploy/ first (so no
    // replica brings back what unregister removes), then unregister.
    uninstall_deploy(&overlay);
    let out = Command::new(BIN)
        .args([
            "unregister",
            "--managed-tls-secret=fn-image-resolver-tls",
            "--registry-auth-secret-name=registry-auth-secret",
        ])
        .env("KUBECONFIG", &c.kubeconfig)
        .output()
        .expect("unregister");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "unregister: {said}");
    assert_no_objects_of_ours();
    // The source Secret is Porch's (its guide makes it): still there.
    kubectl_ok(&["-n", PORCH_NS, "get", "secret", "registry-auth-secret"]);

    // --- Once more where Porch wrote the pull secret first: the mirror
    // keeps it in sync (and labels it), but uninstalling leaves it.
    apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: registry-auth-secret, namespace: {FN_NS}}}\ntype: kubernetes.io/dockerconfigjson\nstringData:\n  .dockerconfigjson: '{auth}'\n"
    ));
    kubectl_ok(&["apply", "-k", &overlay.path().display().to_string()]);
    rollout_status("240s");
    wait_for(
        "the mirror to apply its label to Porch's Secret",
        Duration::from_secs(60),
        || {
            let labels = kubectl_ok(&[
                "-n",
                FN_NS,
                "get",
                "secret",
                "registry-auth-secret",
                "-o",
                "jsonpath={.metadata.labels.app\\.kubernetes\\.io/managed-by}",
            ]);
            (labels.trim() == "fn-image-resolver").then_some(())
        },
    );
    uninstall_deploy(&overlay);
    let out = Command::new(BIN)
        .args([
            "unregister",
            "--managed-tls-secret=fn-image-resolver-tls",
            "--registry-auth-secret-name=registry-auth-secret",
        ])
        .env("KUBECONFIG", &c.kubeconfig)
        .output()
        .expect("unregister");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "unregister: {said}");
    assert!(said.contains("left as it is"), "{said}");
    kubectl_ok(&["-n", FN_NS, "get", "secret", "registry-auth-secret"]);
    delete_namespaces(&[FN_NS, PORCH_NS]);
}

/// The install check the README gives (a server-side dry run of
/// docs/examples/function-pod.yaml), with the example's images moved to the
/// cluster's registry: both come back pinned, nothing is created.
fn the_documented_check_shows_pinned_images(registry: &str) {
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/examples/function-pod.yaml"
    ))
    .expect("docs/examples/function-pod.yaml");
    let moved = example
        .replace(
            "ghcr.io/kptdev/porch-wrapper-server:latest",
            &format!("{registry}/nephio/porch-wrapper-server:v4"),
        )
        .replace(
            "gcr.io/kpt-fn/set-namespace:v0.4.1",
            &format!("{registry}/fns/set-namespace:v0.4"),
        );
    assert_ne!(moved, example, "the example's images moved");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("function-pod.yaml");
    std::fs::write(&file, moved).expect("write");
    let before = kubectl_ok(&["-n", FN_NS, "get", "pods", "-o", "name"]);
    let out = kubectl_ok(&[
        "-n",
        FN_NS,
        "create",
        "--dry-run=server",
        "-o",
        "yaml",
        "-f",
        &file.display().to_string(),
    ]);
    let pod: Pod = serde_saphyr::from_str(&out).expect("a pod");
    let pinned = images_of(&pod);
    assert_eq!(pinned.len(), 2, "{out}");
    assert!(pinned.iter().all(|i| is_pinned(i)), "{out}");
    assert!(
        out.contains("fn-image-resolver.porch.kpt.dev/original-images"),
        "{out}"
    );
    assert_eq!(
        kubectl_ok(&["-n", FN_NS, "get", "pods", "-o", "name"]),
        before,
        "a dry run creates nothing"
    );
}

/// `kubectl delete -k` as the uninstall does it: foreground cascading, so
/// that it returns once the replicas' pods are gone too (none of them can
/// then bring back what `unregister` removes).
pub(crate) fn uninstall_deploy(overlay: &tempfile::TempDir) {
    kubectl_ok(&[
        "delete",
        "-k",
        &overlay.path().display().to_string(),
        "--cascade=foreground",
        "--timeout=120s",
    ]);
}

/// Nothing of ours is left: no webhook configuration, no managed
/// certificate, no mirrored pull secret we created, nothing with our labels.
fn assert_no_objects_of_ours() {
    let (found, out) = kubectl(&["get", "mutatingwebhookconfiguration", "fn-image-resolver"]);
    assert!(!found, "the webhook configuration is left: {out}");
    let (found, out) = kubectl(&["-n", PORCH_NS, "get", "secret", "fn-image-resolver-tls"]);
    assert!(!found, "the managed certificate is left: {out}");
    let (found, out) = kubectl(&["-n", FN_NS, "get", "secret", "registry-auth-secret"]);
    assert!(!found, "the mirrored pull secret is left: {out}");
    for selector in [
        "app.kubernetes.io/name=fn-image-resolver",
        "app=fn-image-resolver",
    ] {
        let left = kubectl_ok(&[
            "get",
            "all,secrets,configmaps,serviceaccounts,roles,rolebindings,clusterroles,clusterrolebindings,poddisruptionbudgets,mutatingwebhookconfigurations",
            "-A",
            "-l",
            selector,
            "-o",
            "name",
        ]);
        assert!(left.trim().is_empty(), "left with {selector}:\n{left}");
    }
}

#[derive(Debug, Default)]
struct Counts {
    created: usize,
    pinned: usize,
    unpinned: usize,
    refused: usize,
    errors: Vec<String>,
}

/// Creates Porch-shaped function pods, about 4 a second, for at least 60 s
/// and until `kubectl rollout restart` of the webhook has completed; each
/// is deleted once stored (only the stored object matters, and one node
/// holds 110 pods).
async fn rollout_under_load(pods: &Api<Pod>, registry: &str) -> Counts {
    let template = porch_pod(registry, registry);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let created = Arc::new(AtomicUsize::new(0));
    let load = {
        let pods = pods.clone();
        let stop = stop.clone();
        let created = created.clone();
        tokio::spawn(async move {
            let mut counts = Counts::default();
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            let mut deletions = tokio::task::JoinSet::new();
            while !stop.load(Ordering::Acquire) {
                tick.tick().await;
                counts.created += 1;
                created.fetch_add(1, Ordering::Release);
                match pods.create(&PostParams::default(), &template).await {
                    Ok(stored) => {
                        if images_of(&stored).iter().all(|i| is_pinned(i)) {
                            counts.pinned += 1;
                        } else {
                            counts.unpinned += 1;
                        }
                        let pods = pods.clone();
                        let name = stored.metadata.name.unwrap_or_default();
                        deletions.spawn(async move {
                            let _ = pods
                                .delete(&name, &DeleteParams::default().grace_period(0))
                                .await;
                        });
                    }
                    Err(e) => {
                        counts.refused += 1;
                        counts.errors.push(e.to_string());
                    }
                }
            }
            while deletions.join_next().await.is_some() {}
            counts
        })
    };
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let restart = tokio::task::spawn_blocking(|| {
        kubectl_ok(&[
            "-n",
            PORCH_NS,
            "rollout",
            "restart",
            "deployment/fn-image-resolver",
        ]);
        rollout_status("300s");
    });
    restart.await.expect("rollout restart");
    println!(
        "rollout restart completed after {:?} of load ({} pods so far)",
        started.elapsed(),
        created.load(Ordering::Acquire)
    );
    let rest = Duration::from_secs(60).saturating_sub(started.elapsed());
    tokio::time::sleep(rest.max(Duration::from_secs(5))).await;
    stop.store(true, Ordering::Release);
    load.await.expect("load task")
}

#[tokio::test]
async fn the_sidecar_component_runs_beside_a_function_runner_on_port_9445() {
    if !enter_with_image_caches(
        "node::the_sidecar_component_runs_beside_a_function_runner_on_port_9445",
    ) {
        return;
    }
    let c = cluster::cluster();
    let ns = "fnir-sidecar";
    delete_namespaces(&[ns]);
    apply(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n"
    ));
    let image = project_image();
    // A stand-in of Porch's function runner, listening on :9445 on all
    // interfaces and probed there as Porch's is, with Porch's volumes.
    let bin = std::fs::read(cluster::testbin()).expect("testbin");
    let runner = oci::runnable_image(
        &[
            File::new("home/nonroot/server", &bin, 0o755),
            File::new("home/nonroot/grpc-health-probe", &bin, 0o755),
            File::new("home/nonroot/function", &bin, 0o755),
            File::new("home/nonroot/wrapper-server", &bin, 0o755),
        ],
        json!({}),
    );
    Pusher::new(format!("http://{}", c.registry), reqwest::Client::new())
        .image("porch/function-runner", "stand-in", &runner)
        .await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("function-runner.yaml"),
        format!(
            "apiVersion: apps/v1
kind: Deployment
metadata: {{name: function-runner, namespace: {ns}}}
spec:
  selector: {{matchLabels: {{app: function-runner}}}}
  template:
    metadata: {{labels: {{app: function-runner}}}}
    spec:
      containers:
        - name: function-runner
          image: {}/porch/function-runner:stand-in
          command: [/home/nonroot/wrapper-server, --port, \"9445\", --, /home/nonroot/function, function-runner]
          ports: [{{containerPort: 9445}}]
          readinessProbe:
            exec: {{command: [/home/nonroot/grpc-health-probe, -addr, localhost:9445]}}
            periodSeconds: 2
          volumeMounts:
            - {{name: docker-config, mountPath: /var/tmp/auth-secret, readOnly: true}}
      volumes:
        - name: docker-config
          secret: {{secretName: registry-auth-secret, optional: true}}
        - name: tls-registry-config
          secret: {{secretName: registry-tls-secret, optional: true}}
",
            c.registry
        ),
    )
    .expect("write");
    let up = "../".repeat(dir.path().components().count() - 1);
    let root = REPO.trim_start_matches('/');
    let (name, digest) = image.split_once('@').expect("pinned");
    let name = name.rsplit_once(':').map_or(name, |(n, _)| n);
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        format!(
            "resources: [function-runner.yaml]
components: [{up}{root}/deploy/components/function-runner-sidecar]
images:
  - name: ghcr.io/kptdev/fn-image-resolver
    newName: {name}
    digest: {digest}
"
        ),
    )
    .expect("write");
    kubectl_ok(&["apply", "-k", &dir.path().display().to_string()]);
    kubectl_ok(&[
        "-n",
        ns,
        "rollout",
        "status",
        "deployment/function-runner",
        "--timeout=180s",
    ]);
    let pod: Value = serde_json::from_str(&kubectl_ok(&[
        "-n",
        ns,
        "get",
        "pods",
        "-l",
        "app=function-runner",
        "-o",
        "json",
    ]))
    .expect("pods");
    let statuses = pod["items"][0]["status"]["containerStatuses"]
        .as_array()
        .expect("container statuses")
        .clone();
    let ready: BTreeSet<(String, bool)> = statuses
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap_or_default().to_string(),
                s["ready"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    assert_eq!(
        ready,
        BTreeSet::from([
            ("fn-image-resolver".to_string(), true),
            ("function-runner".to_string(), true)
        ]),
        "{statuses:#?}"
    );
    // The resolver answers on its loopback port inside that pod.
    let pod_name = pod["items"][0]["metadata"]["name"].as_str().expect("name");
    let out = kubectl_ok(&[
        "-n",
        ns,
        "exec",
        pod_name,
        "-c",
        "fn-image-resolver",
        "--",
        "/usr/local/bin/fn-image-resolver",
        "check",
        "http://127.0.0.1:9447/readyz",
    ]);
    let _ = out;
    delete_namespaces(&[ns]);
}
