//! containerd as the referee, on the real node of tests/cluster: which image
//! of an index it unpacks for the node's platform against what our resolver
//! names; which host it pulls through against the host our resolver asks,
//! from the same hosts.toml; a function pod whose registry is unreachable,
//! pinned by the webhook through the mirror and pulled by the kubelet
//! through it; and whom the node sends a pod's pull secret to.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::cluster::{self, apply, enter, kubectl, kubectl_ok, wait_for};
use crate::common::oci::Pusher;
use crate::common::registry::{Auth, Registry};

/// `ctr` against the cluster's containerd, in namespace `ns`.
fn ctr(ns: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("ctr")
        .arg("--address")
        .arg(&cluster::cluster().containerd)
        .args(["--namespace", ns])
        .args(args)
        .output()
        .expect("run ctr");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// What containerd does with `reference` for the node's platform: the
/// label of the image it unpacked (found by the chain ID of its snapshot:
/// each test image has one layer of its own, so the chain ID is that
/// layer's diff ID) and the digest it recorded for the reference, or `!`
/// when it refuses.
fn containerd_pull(
    ns: &str,
    reference: &str,
    by_layer: &HashMap<String, &'static str>,
) -> (String, Option<String>) {
    let certs_d = cluster::cluster().certs_d.display().to_string();
    let (ok, out) = ctr(
        ns,
        &[
            "images",
            "pull",
            "--hosts-dir",
            &certs_d,
            "--platform",
            "linux/amd64",
            "--print-chainid",
            reference,
        ],
    );
    if !ok {
        let reason = out.lines().last().unwrap_or_default().to_string();
        eprintln!("containerd refuses {reference}: {reason}");
        return ("!".into(), None);
    }
    let chain = out
        .lines()
        .find_map(|l| l.split("chain ID: ").nth(1))
        .map(str::trim)
        .unwrap_or_default();
    let (_, listed) = ctr(ns, &["images", "ls"]);
    let digest = listed
        .lines()
        .find(|l| l.starts_with(reference))
        .and_then(|l| l.split_whitespace().find(|w| w.starts_with("sha256:")))
        .map(str::to_string);
    (
        by_layer
            .get(chain)
            .map_or_else(|| format!("? (chain {chain})"), |l| l.to_string()),
        digest,
    )
}

/// Where we and containerd differ for the node's platform, and why: ours,
/// containerd's.
const DIFFERENCES: &[(&str, &str, &str, &str)] = &[
    (
        "nested-5",
        "!unsupported-image",
        "nested-amd",
        "we descend at most 4 nested indexes; containerd has no limit",
    ),
    (
        "nul-argument",
        "!unsupported-image",
        "nul-argument",
        "containerd unpacks it; no process can be started with a NUL in an argument, so we refuse it at once",
    ),
];

#[tokio::test]
async fn containerd_unpacks_the_image_our_resolver_names_for_every_shape() {
    if !enter("referee::containerd_unpacks_the_image_our_resolver_names_for_every_shape") {
        return;
    }
    let c = cluster::cluster();
    let built = crate::crane::shapes();
    let pusher = Pusher::new(format!("http://{}", c.registry), reqwest::Client::new());
    let pinned = built.push(&pusher, "referee").await;
    let by_entrypoint = built.by_entrypoint();
    let by_layer: HashMap<String, &'static str> = built
        .images
        .iter()
        .map(|(label, image)| {
            let config: Value = serde_json::from_slice(&image.config.bytes).expect("config");
            let diff_id = config["rootfs"]["diff_ids"][0]
                .as_str()
                .expect("a real layer")
                .to_string();
            (diff_id, *label)
        })
        .collect();
    let mut settings = crate::settings();
    settings.insecure_hosts = vec![c.registry.clone()];
    let r = crate::resolver(&settings);
    let run = std::process::id();
    let mut lines = Vec::new();
    let mut names: Vec<&str> = built.shapes.iter().map(|(s, _)| *s).collect();
    names.push("upper-case-digest");
    for shape in names {
        let reference = if shape == "upper-case-digest" {
            format!(
                "{}/referee/single@sha256:{}",
                c.registry,
                pinned["single"]
                    .trim_start_matches("sha256:")
                    .to_uppercase()
            )
        } else {
            format!("{}/referee/{shape}:v1", c.registry)
        };
        let ours = r.resolve(&reference, None).await;
        let ours_label = match &ours {
            Ok(info) => by_entrypoint
                .get(
                    info.entrypoint
                        .first()
                        .map(String::as_str)
                        .unwrap_or_default(),
                )
                .map_or_else(|| "?".to_string(), |l| l.to_string()),
            Err(e) => format!("!{}", e.kind().as_str()),
        };
        let ns = format!("referee-{run}-{shape}");
        let (theirs, their_digest) = containerd_pull(&ns, &reference, &by_layer);
        if let (Ok(info), Some(digest)) = (&ours, &their_digest) {
            assert_eq!(&info.digest, digest, "{shape}: the same top digest");
            assert_eq!(info.digest, pinned[shape], "{shape}");
        }
        let agree = ours_label == theirs || (ours_label.starts_with('!') && theirs == "!");
        lines.push((shape, ours_label, theirs, agree));
    }
    let mut unexplained = Vec::new();
    for (shape, ours, theirs, agree) in &lines {
        let written = DIFFERENCES.iter().find(|d| d.0 == *shape);
        match (agree, written) {
            (true, None) => {}
            (false, Some(d)) if d.1 == ours && d.2 == theirs => {}
            _ => unexplained.push(format!("{shape}: ours {ours}, containerd {theirs}")),
        }
    }
    for (shape, ours, theirs, _) in &lines {
        println!("{shape}: ours {ours}, containerd {theirs}");
    }
    assert!(
        unexplained.is_empty(),
        "containerd decides what the node runs; differences not written down:\n{}",
        unexplained.join("\n")
    );
}

/// A plain-HTTP registry on the node's address, with an access log.
fn logged_registry() -> Registry {
    let c = cluster::cluster();
    Registry::start_with(
        &c.node_ip,
        crate::common::free_port(),
        None,
        Auth::None,
        None,
        true,
    )
}

/// Requests in `registry`'s access log for `repository` whose User-Agent
/// starts with `agent`.
fn requests(registry: &Registry, repository: &str, agent: &str) -> usize {
    registry
        .log()
        .lines()
        .filter(|l| l.contains(&format!("/v2/{repository}/")))
        .filter(|l| l.contains(&format!("\"{agent}")))
        .count()
}

#[tokio::test]
async fn containerd_and_our_resolver_pull_through_the_same_host_of_the_same_hosts_toml() {
    if !enter(
        "referee::containerd_and_our_resolver_pull_through_the_same_host_of_the_same_hosts_toml",
    ) {
        return;
    }
    let (upstream, mirror) = (logged_registry(), logged_registry());
    let image = crate::common::oci::image("app", Some(&["/app"]), None, "linux/amd64", false);
    for registry in [&upstream, &mirror] {
        Pusher::new(registry.url(), reqwest::Client::new())
            .image("referee/app", "v1", &image)
            .await;
    }
    // A registry name of its own, whose server is the upstream, mirrored.
    let hosts = tempfile::tempdir().expect("tempdir");
    let dir = hosts.path().join("registry.referee.test");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(
        dir.join("hosts.toml"),
        format!(
            "server = \"http://{}\"\n\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            upstream.host, mirror.host
        ),
    )
    .expect("hosts.toml");
    let reference = "registry.referee.test/referee/app:v1";
    let (ok, out) = ctr(
        &format!("referee-{}-hosts", std::process::id()),
        &[
            "images",
            "pull",
            "--hosts-dir",
            &hosts.path().display().to_string(),
            "--platform",
            "linux/amd64",
            reference,
        ],
    );
    assert!(ok, "containerd pulls through the mirror: {out}");
    let mut settings = crate::settings();
    settings.registry_config_path = Some(hosts.path().to_path_buf());
    let got = crate::resolver(&settings)
        .resolve(reference, None)
        .await
        .expect("we resolve through the mirror");
    assert_eq!(got.digest, image.digest);
    let log = |r: &Registry, agent| requests(r, "referee/app", agent);
    println!(
        "mirror: containerd {}, ours {}; upstream: containerd {}, ours {}",
        log(&mirror, "containerd"),
        log(&mirror, "fn-image-resolver"),
        log(&upstream, "containerd"),
        log(&upstream, "fn-image-resolver")
    );
    assert!(log(&mirror, "containerd") > 0, "{}", mirror.log());
    assert!(log(&mirror, "fn-image-resolver") > 0, "{}", mirror.log());
    assert_eq!(log(&upstream, "containerd"), 0, "{}", upstream.log());
    assert_eq!(log(&upstream, "fn-image-resolver"), 0, "{}", upstream.log());
}

const USER: &str = "mirror-user";
const PASS: &str = "mirror-PASSWORD";

/// A TLS + htpasswd registry on the node's address holding the function
/// pod's images as a `ghcr.io` mirror would, and `hosts.toml` text that
/// makes it ghcr.io's first host (its CA beside it as `ca.crt`; its
/// credentials in an Authorization header when `header`).
async fn ghcr_mirror(header: bool) -> (Registry, String, String, crate::node::FunctionImages) {
    let c = cluster::cluster();
    let ca = fn_image_resolver::certs::CertificateAuthority::generate("ghcr mirror").expect("ca");
    let issued = ca.issue(std::slice::from_ref(&c.node_ip)).expect("issue");
    let registry = Registry::start_with(
        &c.node_ip,
        crate::common::free_port(),
        Some(&issued),
        Auth::Basic {
            user: USER.into(),
            pass: PASS.into(),
        },
        None,
        true,
    );
    let ca_pem = ca.cert_pem();
    let images = crate::node::function_images();
    let pusher = Pusher::new(registry.url(), crate::client_trusting(&ca_pem)).basic(USER, PASS);
    crate::node::push_function_images(&pusher, &images).await;
    let mut toml = format!(
        "[host.\"https://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"ca.crt\"\n",
        registry.host
    );
    if header {
        toml.push_str(&format!(
            "  [host.\"https://{}\".header]\n    Authorization = \"Basic {}\"\n",
            registry.host,
            crate::basic_auth(USER, PASS)
        ));
    }
    (registry, ca_pem, toml, images)
}

/// Removes the `ghcr.io` images the node has from earlier runs, so that
/// this one pulls.
fn forget_ghcr_images() {
    let (_, listed) = ctr("k8s.io", &["images", "ls", "-q"]);
    for image in listed.lines().filter(|l| l.starts_with("ghcr.io/")) {
        let _ = ctr("k8s.io", &["images", "rm", image]);
    }
}

/// Writes the node's `ghcr.io/hosts.toml` (and its `ca.crt`).
fn node_hosts(toml: &str, ca_pem: &str) {
    let dir = cluster::cluster().certs_d.join("ghcr.io");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("ca.crt"), ca_pem).expect("ca.crt");
    std::fs::write(dir.join("hosts.toml"), toml).expect("hosts.toml");
}

#[tokio::test]
async fn a_function_pod_of_an_unreachable_registry_is_pinned_and_pulled_through_its_mirror() {
    if !crate::node::enter_with_image_caches(
        "referee::a_function_pod_of_an_unreachable_registry_is_pinned_and_pulled_through_its_mirror",
    ) {
        return;
    }
    let (mirror, ca_pem, toml, images) = ghcr_mirror(true).await;
    node_hosts(&toml, &ca_pem);
    forget_ghcr_images();
    // The same files for `resolve`.
    let mut settings = crate::settings();
    settings.registry_config_path = Some(cluster::cluster().certs_d.clone());
    let got = crate::resolver(&settings)
        .resolve("ghcr.io/fns/set-namespace:v0.4", None)
        .await
        .expect("resolve through the mirror");
    assert_eq!(got.digest, images.function.digest);

    // The webhook, installed with the registry-hosts component holding the
    // same hosts.toml and CA.
    crate::node::reset_porch();
    let image = crate::node::project_image();
    let up = "../".repeat(
        tempfile::tempdir()
            .expect("tempdir")
            .path()
            .components()
            .count()
            - 1,
    );
    let component = format!(
        "{up}{}/deploy/components/registry-hosts",
        env!("CARGO_MANIFEST_DIR").trim_start_matches('/')
    );
    // As the component's comment says: the ConfigMap from our files, and
    // the volume mapping each key to its path.
    let overlay = crate::node::operator_kustomization_with(
        &image,
        "  - target: {kind: Deployment, name: fn-image-resolver}
    patch: |
      - op: add
        path: /spec/template/spec/volumes/-
        value:
          name: registry-hosts
          configMap:
            name: fn-image-resolver-registry-hosts
            items:
              - {key: ghcr.io.hosts.toml, path: ghcr.io/hosts.toml}
              - {key: ghcr.io.ca.crt, path: ghcr.io/ca.crt}
",
        &format!(
            "components: [{component}]
configMapGenerator:
  - name: fn-image-resolver-registry-hosts
    namespace: porch-system
    files: [ghcr.io.hosts.toml, ghcr.io.ca.crt]
    options: {{disableNameSuffixHash: true}}
"
        ),
    );
    std::fs::write(overlay.path().join("ghcr.io.hosts.toml"), &toml).expect("write");
    std::fs::write(overlay.path().join("ghcr.io.ca.crt"), &ca_pem).expect("write");
    let built = kubectl_ok(&["kustomize", &overlay.path().display().to_string()]);
    assert!(built.contains("path: ghcr.io/hosts.toml"), "{built}");
    kubectl_ok(&["apply", "-k", &overlay.path().display().to_string()]);
    crate::node::rollout_status("240s");

    // A Porch function pod with both images on ghcr.io, which is
    // unreachable here: pinned to the mirror's digests, pulled by the
    // kubelet through the mirror, running.
    let client = cluster::client().await;
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(client, "porch-fn-system");
    let pod = crate::e2e::function_pod_with_wrapper("ghcr.io", "ghcr.io");
    crate::node::wait_until_the_webhook_answers(&pods, &pod).await;
    let stored = pods
        .create(&kube::api::PostParams::default(), &pod)
        .await
        .expect("create");
    let spec = stored.spec.as_ref().expect("spec");
    assert_eq!(
        spec.containers[0].image.as_deref(),
        Some(format!("ghcr.io/fns/set-namespace:v0.4@{}", images.function.digest).as_str())
    );
    assert_eq!(
        spec.init_containers.as_ref().expect("init")[0]
            .image
            .as_deref(),
        Some(
            format!(
                "ghcr.io/nephio/porch-wrapper-server:v4@{}",
                images.wrapper.digest
            )
            .as_str()
        )
    );
    let name = stored.metadata.name.clone().expect("name");
    crate::node::wait_running_and_ready("porch-fn-system", &name);
    assert!(
        requests(&mirror, "fns/set-namespace", "containerd") > 0,
        "the kubelet pulled through the mirror:\n{}",
        mirror.log()
    );
    assert!(
        requests(&mirror, "fns/set-namespace", "fn-image-resolver") > 0,
        "the webhook resolved through the mirror:\n{}",
        mirror.log()
    );
    crate::node::uninstall_deploy(&overlay);
    std::fs::remove_dir_all(cluster::cluster().certs_d.join("ghcr.io")).expect("rm");
}

#[tokio::test]
async fn the_node_answers_a_mirrors_challenge_with_the_pods_pull_secret() {
    if !enter("referee::the_node_answers_a_mirrors_challenge_with_the_pods_pull_secret") {
        return;
    }
    // A mirror that asks for credentials, and a hosts.toml that gives none.
    let (_mirror, ca_pem, toml, _images) = ghcr_mirror(false).await;
    node_hosts(&toml, &ca_pem);
    forget_ghcr_images();
    let ns = "fnir-referee-secret";
    let _ = kubectl(&["delete", "namespace", ns, "--wait=true"]);
    apply(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n"
    ));
    wait_for(
        "the default ServiceAccount",
        Duration::from_secs(30),
        || {
            kubectl(&["-n", ns, "get", "serviceaccount", "default"])
                .0
                .then_some(())
        },
    );
    // The pull secret names ghcr.io, the image's registry, not the mirror.
    let auth = json!({"auths": {"ghcr.io": {"auth": crate::basic_auth(USER, PASS)}}});
    apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: ghcr, namespace: {ns}}}\ntype: kubernetes.io/dockerconfigjson\nstringData:\n  .dockerconfigjson: '{auth}'\n"
    ));
    let pod = |name: &str, secret: bool| -> Value {
        let mut pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"containers": [{
                "name": "f",
                "image": "ghcr.io/fns/set-namespace:v0.4",
                "imagePullPolicy": "Always"
            }], "restartPolicy": "Never"}
        });
        if secret {
            pod["spec"]["imagePullSecrets"] = json!([{"name": "ghcr"}]);
        }
        pod
    };
    apply(&pod("without-secret", false).to_string());
    wait_for(
        "the pod without the secret to fail its pull",
        Duration::from_secs(90),
        || {
            let (_, out) = kubectl(&["-n", ns, "get", "pod", "without-secret", "-o", "json"]);
            let p: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
            let reason = p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            (reason == "ErrImagePull" || reason == "ImagePullBackOff").then_some(())
        },
    );
    apply(&pod("with-secret", true).to_string());
    // The function stand-in prints its line and exits: pulled and run.
    wait_for(
        "the pod with the secret to run",
        Duration::from_secs(90),
        || {
            let (_, out) = kubectl(&["-n", ns, "get", "pod", "with-secret", "-o", "json"]);
            let p: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
            let state = &p["status"]["containerStatuses"][0]["state"];
            assert!(
                state["waiting"]["reason"] != "ErrImagePull",
                "the node did not send the pull secret to the mirror: {p}"
            );
            (state["terminated"].is_object() || state["running"].is_object()).then_some(())
        },
    );
    let _ = kubectl(&["delete", "namespace", ns, "--wait=false"]);
    std::fs::remove_dir_all(cluster::cluster().certs_d.join("ghcr.io")).expect("rm");
}
