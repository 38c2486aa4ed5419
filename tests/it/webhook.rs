//! The admission webhook over real HTTPS against the real test registry.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine as _;
use fn_image_resolver::admission::mutate::{ORIGINAL_IMAGES_ANNOTATION, UNPINNED_ANNOTATION};
use fn_image_resolver::admission::{AdmissionSettings, Admitter, FailureMode};
use fn_image_resolver::app::{Callers, ServingCertificate, WebhookConfig};
use fn_image_resolver::cache::CacheSettings;
use fn_image_resolver::registry::ResolverSettings;
use serde_json::{Value, json};

use crate::common::proxy::{Fault, Kind};
use crate::resolve_auth::{PASSWORD, token_env};
use crate::{PlainEnv, admission_settings, basic_auth, cached, client_trusting, docker_config};

const RESOLVER_TOKEN: &str = "resolver-caller-TOKEN-marker";

fn review(registry: &str) -> Value {
    serde_json::from_str(&crate::common::function_pod_review(registry, registry)).expect("fixture")
}

/// `serve` in process with the webhook on HTTPS (a generated CA) and the
/// resolver on it for holders of `RESOLVER_TOKEN`.
struct Webhook {
    base: String,
    client: reqwest::Client,
    certs: tempfile::TempDir,
    running: fn_image_resolver::app::Running,
}

async fn webhook(settings: &ResolverSettings, failure_mode: FailureMode) -> Webhook {
    let mut admission = admission_settings();
    admission.failure_mode = failure_mode;
    webhook_with(settings, admission).await
}

async fn webhook_with(settings: &ResolverSettings, admission: AdmissionSettings) -> Webhook {
    crate::common::init_crypto();
    let certs = tempfile::tempdir().expect("tempdir");
    let names = vec!["127.0.0.1".to_string(), "localhost".to_string()];
    fn_image_resolver::certs::write_bundle(certs.path(), &names, false).expect("certs");
    std::fs::write(
        certs.path().join("tokens"),
        format!("# callers\n{RESOLVER_TOKEN},function-runner\n"),
    )
    .expect("tokens");
    let mut config = crate::serve_config(settings, CacheSettings::default());
    config.admission = admission;
    config.http.drain = Duration::from_secs(5);
    config.webhook = Some(WebhookConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        certificate: ServingCertificate::Files {
            cert: certs.path().join("tls.crt"),
            key: certs.path().join("tls.key"),
        },
        callers: Callers::TokenFile(certs.path().join("tokens")),
    });
    let running = fn_image_resolver::app::start(config)
        .await
        .expect("serve starts");
    let addr = running.webhook_addr.expect("the webhook listens");
    let ca = std::fs::read_to_string(certs.path().join("ca.crt")).expect("ca");
    Webhook {
        base: format!("https://{addr}"),
        client: client_trusting(&ca),
        certs,
        running,
    }
}

impl Webhook {
    fn metrics(&self) -> Arc<fn_image_resolver::metrics::Metrics> {
        self.running.metrics.clone()
    }

    async fn post(&self, body: &Value, query: &str) -> (u16, Value) {
        let resp = self
            .client
            .post(format!("{}/mutate{query}", self.base))
            .json(body)
            .send()
            .await
            .expect("request");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }
}

/// Applies the response's patch to the review's object.
fn patched(review: &Value, answer: &Value) -> Value {
    let mut pod = review["request"]["object"].clone();
    if let Some(p) = answer["response"]["patch"].as_str() {
        assert_eq!(answer["response"]["patchType"], "JSONPatch");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(p)
            .expect("patch is base64");
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).expect("JSON patch");
        json_patch::patch(&mut pod, &patch).expect("patch applies");
    }
    pod
}

/// The JSON Patch of an answer, decoded.
fn patch_of(answer: &Value) -> Value {
    answer["response"]["patch"]
        .as_str()
        .map(|p| {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(p)
                .expect("patch is base64");
            serde_json::from_slice(&bytes).expect("JSON patch")
        })
        .unwrap_or(Value::Null)
}

/// `{container: value}` of a JSON annotation of `pod`.
fn annotation(pod: &Value, key: &str) -> Value {
    pod["metadata"]["annotations"][key]
        .as_str()
        .map(|v| serde_json::from_str(v).expect("JSON annotation"))
        .unwrap_or(Value::Null)
}

#[tokio::test]
async fn a_real_porch_function_pod_is_pinned_its_args_untouched_and_the_second_pass_is_a_no_op() {
    let env = PlainEnv::start().await;
    let hook = webhook(&env.settings(), FailureMode::Open).await;
    let review = review(&env.proxy.host);
    let (status, answer) = hook.post(&review, "?timeout=10s").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(answer["response"]["uid"], review["request"]["uid"]);
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("warnings").is_none(), "{answer}");
    let ops = patch_of(&answer);
    assert!(
        !ops.to_string().contains("/args") && !ops.to_string().contains("/command"),
        "Porch already wrote the entrypoint: {ops}"
    );
    let pod = patched(&review, &answer);
    let function = &pod["spec"]["containers"][0];
    assert_eq!(
        function["image"],
        format!(
            "{}/fns/set-namespace:v0.4@{}",
            env.proxy.host, env.samples.entrypoint.digest
        )
    );
    assert_eq!(
        function["args"],
        review["request"]["object"]["spec"]["containers"][0]["args"]
    );
    let init = &pod["spec"]["initContainers"][0];
    assert_eq!(
        init["image"],
        format!(
            "{}/nephio/porch-wrapper-server:v4@{}",
            env.proxy.host, env.samples.wrapper.digest
        )
    );
    assert_eq!(
        init["command"],
        json!([
            "cp",
            "-a",
            "/home/nonroot/wrapper-server/.",
            "/wrapper-server-tools"
        ])
    );
    assert_eq!(
        pod["metadata"]["annotations"]["fn.kpt.dev/template-version"],
        "4711"
    );
    assert_eq!(
        annotation(&pod, ORIGINAL_IMAGES_ANNOTATION),
        json!({
            "copy-wrapper-server": format!("{}/nephio/porch-wrapper-server:v4", env.proxy.host),
            "function": format!("{}/fns/set-namespace:v0.4", env.proxy.host),
        })
    );
    assert!(
        pod["spec"].get("imagePullSecrets").is_none(),
        "anonymous registry: no secret"
    );

    // Reinvocation on our own output changes nothing.
    let mut again = review.clone();
    again["request"]["object"] = pod;
    let (_, answer) = hook.post(&again, "").await;
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none(), "{answer}");
}

#[tokio::test]
async fn a_trailing_separator_gets_the_entrypoint_and_a_stale_one_is_replaced_with_a_warning() {
    let env = PlainEnv::start().await;
    let hook = webhook(&env.settings(), FailureMode::Open).await;
    let head = json!(["--port", "9446", "--max-request-body-size", "6291456", "--"]);
    // The wrapper-server's args with the image's entrypoint after `--`.
    let filled = json!([
        "--port",
        "9446",
        "--max-request-body-size",
        "6291456",
        "--",
        "/usr/local/bin/function"
    ]);
    let with_args = |args: Value| {
        let mut review = review(&env.proxy.host);
        review["request"]["object"]["spec"]["containers"][0]["args"] = args;
        review
    };

    let trailing = with_args(head.clone());
    let (_, answer) = hook.post(&trailing, "").await;
    let pod = patched(&trailing, &answer);
    assert_eq!(pod["spec"]["containers"][0]["args"], filled);
    assert!(answer["response"].get("warnings").is_none(), "{answer}");

    // Porch keeps entrypoints forever: after the tag moved it writes the old one.
    let stale = with_args(json!([
        "--port",
        "9446",
        "--max-request-body-size",
        "6291456",
        "--",
        "/old/function",
        "run"
    ]));
    let (_, answer) = hook.post(&stale, "").await;
    assert_eq!(answer["response"]["allowed"], true);
    let pod = patched(&stale, &answer);
    assert_eq!(pod["spec"]["containers"][0]["args"], filled);
    let warning = answer["response"]["warnings"].to_string();
    assert!(
        warning.contains("function")
            && warning.contains("/old/function")
            && warning.contains("/usr/local/bin/function"),
        "{answer}"
    );
    let metrics = crate::metrics_text_of(&hook.metrics());
    assert!(
        metrics.contains("fn_image_resolver_admission_entrypoints_replaced_total 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn unlabeled_pods_other_namespaces_updates_and_non_pods_are_allowed_unchanged() {
    let env = PlainEnv::start().await;
    let hook = webhook(&env.settings(), FailureMode::Open).await;
    let base = review(&env.proxy.host);
    let mut other_ns = base.clone();
    other_ns["request"]["namespace"] = json!("default");
    let mut update = base.clone();
    update["request"]["operation"] = json!("UPDATE");
    let mut configmap = base.clone();
    configmap["request"]["kind"] = json!({"group": "", "version": "v1", "kind": "ConfigMap"});
    configmap["request"]["object"] =
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {}});
    let mut unlabeled = base.clone();
    unlabeled["request"]["object"]["metadata"]["labels"] = json!({"app": "something-else"});
    let mut no_labels = base.clone();
    no_labels["request"]["object"]["metadata"]
        .as_object_mut()
        .expect("metadata")
        .remove("labels");
    for (name, review) in [
        ("other namespace", other_ns),
        ("update", update),
        ("configmap", configmap),
        ("another label", unlabeled),
        ("no labels", no_labels),
    ] {
        let (status, answer) = hook.post(&review, "").await;
        assert_eq!(status, 200, "{name}");
        assert_eq!(answer["response"]["uid"], base["request"]["uid"], "{name}");
        assert_eq!(answer["response"]["allowed"], true, "{name}");
        assert!(
            answer["response"].get("patch").is_none(),
            "{name}: {answer}"
        );
    }
    assert_eq!(env.proxy.total(), 0, "nothing was resolved");
}

#[tokio::test]
async fn the_function_container_is_the_one_with_the_separator_and_others_are_pinned_only() {
    let env = PlainEnv::start().await;
    let hook = webhook(&env.settings(), FailureMode::Open).await;
    let host = &env.proxy.host;
    let pinned = format!("{host}/fns/set-namespace@{}", env.samples.entrypoint.digest);
    let mut review = review(host);
    review["request"]["object"]["spec"]["containers"] = json!([
        {"name": "function", "image": format!("{host}/fns/multi-arch:v1"),
         "command": ["/wrapper-server-tools/wrapper-server"], "args": ["--port", "9446", "--"]},
        {"name": "pinned", "image": pinned, "args": ["--"]},
        {"name": "no-command", "image": format!("{host}/fns/cmd-only:v1")}
    ]);
    review["request"]["object"]["spec"]["imagePullSecrets"] = json!([{"name": "auth-secret"}]);
    let (_, answer) = hook.post(&review, "").await;
    let pod = patched(&review, &answer);
    let c = &pod["spec"]["containers"];
    assert_eq!(
        c[0]["image"],
        format!("{host}/fns/multi-arch:v1@{}", env.samples.multi.digest)
    );
    assert_eq!(
        c[0]["args"],
        json!(["--port", "9446", "--", "/fn-amd64"]),
        "the --platform child's entrypoint"
    );
    assert_eq!(
        c[1]["image"],
        pinned.as_str(),
        "already pinned: kept as written"
    );
    assert_eq!(c[1]["args"], json!(["--"]), "not the function container");
    assert_eq!(
        c[2]["image"],
        format!("{host}/fns/cmd-only:v1@{}", env.samples.cmd_only.digest)
    );
    assert!(
        c[2].get("command").is_none() && c[2].get("args").is_none(),
        "a container without a command is pinned only: {}",
        c[2]
    );
    assert_eq!(
        pod["spec"]["imagePullSecrets"],
        json!([{"name": "auth-secret"}])
    );
}

#[tokio::test]
async fn a_wrapper_image_the_webhook_cannot_read_is_admitted_as_written_with_a_warning() {
    // The function's registry is open; the wrapper-server's answers 401 to
    // us (the kubelet may still pull it: node credentials, mirrors, ...).
    let functions = PlainEnv::start().await;
    let locked = token_env().await;
    let mut settings = functions.settings();
    settings.insecure_hosts.push(locked.proxy.host.clone());
    settings
        .insecure_hosts
        .push(format!("127.0.0.1:{}", locked.tokens.port));
    for mode in [FailureMode::Open, FailureMode::Closed] {
        let hook = webhook(&settings, mode).await;
        let body: Value = serde_json::from_str(&crate::common::function_pod_review(
            &functions.proxy.host,
            &locked.proxy.host,
        ))
        .expect("fixture");
        let (status, answer) = hook.post(&body, "").await;
        assert_eq!(status, 200);
        if mode == FailureMode::Closed {
            assert_eq!(answer["response"]["allowed"], false, "{answer}");
            continue;
        }
        assert_eq!(answer["response"]["allowed"], true, "{answer}");
        let pod = patched(&body, &answer);
        let wrapper = format!("{}/nephio/porch-wrapper-server:v4", locked.proxy.host);
        assert_eq!(pod["spec"]["initContainers"][0]["image"], wrapper.as_str());
        assert_eq!(
            pod["spec"]["containers"][0]["image"],
            format!(
                "{}/fns/set-namespace:v0.4@{}",
                functions.proxy.host, functions.samples.entrypoint.digest
            )
        );
        let warnings = answer["response"]["warnings"].to_string();
        assert!(
            warnings.contains("copy-wrapper-server") && warnings.contains(&wrapper),
            "{warnings}"
        );
        let unpinned = annotation(&pod, UNPINNED_ANNOTATION);
        assert!(
            unpinned["copy-wrapper-server"]
                .as_str()
                .is_some_and(|r| r.contains("refused")),
            "{unpinned}"
        );
        let metrics = crate::metrics_text_of(&hook.metrics());
        assert!(
            metrics.contains(
                "fn_image_resolver_admission_containers_unpinned_total{reason=\"unauthorized\"} 1"
            ) && metrics
                .contains("fn_image_resolver_admission_reviews_total{result=\"failed-open\"} 1"),
            "{metrics}"
        );
    }
}

#[tokio::test]
async fn the_function_image_can_be_left_unpinned_while_its_entrypoint_is_checked() {
    let env = PlainEnv::start().await;
    let mut admission = admission_settings();
    admission.pin_function_image = false;
    let hook = webhook_with(&env.settings(), admission).await;
    let mut review = review(&env.proxy.host);
    review["request"]["object"]["spec"]["containers"][0]["args"] =
        json!(["--port", "9446", "--", "/old/function"]);
    let (_, answer) = hook.post(&review, "").await;
    let pod = patched(&review, &answer);
    assert_eq!(
        pod["spec"]["containers"][0]["image"],
        format!("{}/fns/set-namespace:v0.4", env.proxy.host),
        "as written: Porch re-adopts its pods by this string"
    );
    assert_eq!(
        pod["spec"]["containers"][0]["args"],
        json!(["--port", "9446", "--", "/usr/local/bin/function"])
    );
    assert!(
        pod["spec"]["initContainers"][0]["image"]
            .as_str()
            .is_some_and(|i| i.contains("@sha256:"))
    );
}

#[tokio::test]
async fn images_from_an_authenticated_registry_get_the_pull_secret() {
    let env = token_env().await;
    let host = env.proxy.host.clone();
    let (_d, cfg) =
        docker_config(&json!({"auths": {host.clone(): {"auth": basic_auth("fn-user", PASSWORD)}}}));
    let hook = webhook(&env.settings(&cfg), FailureMode::Open).await;
    let review = review(&host);
    let (_, answer) = hook.post(&review, "").await;
    let pod = patched(&review, &answer);
    assert_eq!(
        pod["spec"]["imagePullSecrets"],
        json!([{"name": "auth-secret"}])
    );
    assert_eq!(
        pod["spec"]["containers"][0]["image"],
        format!(
            "{host}/fns/set-namespace:v0.4@{}",
            env.samples.entrypoint.digest
        )
    );
    assert!(!answer.to_string().contains(PASSWORD));
}

#[tokio::test]
async fn definitive_errors_deny_with_the_reason() {
    let env = PlainEnv::start().await;
    let hook = webhook(&env.settings(), FailureMode::Open).await;
    let mut missing = review(&env.proxy.host);
    missing["request"]["object"]["spec"]["containers"][0]["image"] =
        json!(format!("{}/fns/nope:v1", env.proxy.host));
    let (status, answer) = hook.post(&missing, "").await;
    assert_eq!(status, 200);
    assert_eq!(answer["response"]["allowed"], false);
    assert_eq!(answer["response"]["status"]["code"], 404);
    assert!(
        answer["response"]["status"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("fns/nope:v1") && m.contains("not found")),
        "{answer}"
    );

    let mut empty = review(&env.proxy.host);
    empty["request"]["object"]["spec"]["containers"][0]["image"] =
        json!(format!("{}/fns/no-entrypoint:v1", env.proxy.host));
    let (_, answer) = hook.post(&empty, "").await;
    assert_eq!(answer["response"]["allowed"], false);
    assert!(
        answer["response"]["status"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("neither Entrypoint nor Cmd")),
        "{answer}"
    );
}

#[tokio::test]
async fn a_registry_slower_than_the_budget_fails_open_or_closed_as_configured() {
    let env = PlainEnv::start().await;
    env.proxy.set_fault(
        Fault::Delay(Duration::from_millis(1500)),
        Some(Kind::Manifest),
    );
    let review = review(&env.proxy.host);

    let open = webhook(&env.settings(), FailureMode::Open).await;
    let started = std::time::Instant::now();
    let (status, answer) = open.post(&review, "?timeout=1s").await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered within the API server's budget"
    );
    assert_eq!(status, 200);
    assert_eq!(answer["response"]["allowed"], true);
    let pod = patched(&review, &answer);
    assert_eq!(
        pod["spec"]["containers"], review["request"]["object"]["spec"]["containers"],
        "admitted as written"
    );
    let unpinned = annotation(&pod, UNPINNED_ANNOTATION);
    assert!(
        unpinned["function"]
            .as_str()
            .is_some_and(|r| r.contains("admission budget"))
            && unpinned["copy-wrapper-server"].is_string(),
        "{unpinned}"
    );
    assert!(
        answer["response"]["warnings"][0]
            .as_str()
            .is_some_and(|w| w.contains("admitted as written")),
        "{answer}"
    );

    let closed = webhook(&env.settings(), FailureMode::Closed).await;
    let (_, answer) = closed.post(&review, "?timeout=1s").await;
    assert_eq!(answer["response"]["allowed"], false);
    assert_eq!(answer["response"]["status"]["code"], 503);

    // The fetch that missed the deadline finished in the background: the
    // API server's retry is answered from the cache.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_, answer) = open.post(&review, "?timeout=1s").await;
    let pod = patched(&review, &answer);
    assert!(
        pod["spec"]["containers"][0]["image"]
            .as_str()
            .is_some_and(|i| i.contains("@sha256:")),
        "{answer}"
    );
    assert!(annotation(&pod, UNPINNED_ANNOTATION).is_null());
}

#[tokio::test]
async fn bad_reviews_are_400_and_oversized_ones_413() {
    let env = PlainEnv::start().await;
    let hook = webhook(&env.settings(), FailureMode::Open).await;
    let url = format!("{}/mutate", hook.base);
    let mut wrong_version = review(&env.proxy.host);
    wrong_version["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let mut no_request = review(&env.proxy.host);
    no_request
        .as_object_mut()
        .expect("object")
        .remove("request");
    let cases: Vec<(Vec<u8>, u16)> = vec![
        (b"{not json".to_vec(), 400),
        (b"[]".to_vec(), 400),
        (serde_json::to_vec(&wrong_version).expect("json"), 400),
        (serde_json::to_vec(&no_request).expect("json"), 400),
        (vec![b' '; 5 * 1024 * 1024], 413),
    ];
    for (body, want) in cases {
        let resp = hook
            .client
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status().as_u16(), want);
        let body: Value = resp.json().await.expect("JSON error");
        assert!(body["error"]["message"].is_string(), "{body}");
    }
    let (status, _) = hook.post(&review(&env.proxy.host), "").await;
    assert_eq!(status, 200, "still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificates_are_served_without_a_failed_request() {
    let env = PlainEnv::start().await;
    let hook = webhook(&env.settings(), FailureMode::Open).await;
    let old_ca = std::fs::read_to_string(hook.certs.path().join("ca.crt")).expect("ca");
    let next = crate::common::loopback_certs();
    let new_ca = std::fs::read_to_string(next.path().join("ca.crt")).expect("ca");

    // A client that trusts both CAs keeps connecting (new connection each
    // time) through the rotation; none of its requests may fail.
    let both = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(old_ca.as_bytes()).expect("ca"))
        .add_root_certificate(reqwest::Certificate::from_pem(new_ca.as_bytes()).expect("ca"))
        .tls_built_in_root_certs(false)
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let failures = Arc::new(AtomicUsize::new(0));
    let completed = Arc::new(AtomicUsize::new(0));
    let done = tokio_util::sync::CancellationToken::new();
    let hammer = {
        let (failures, completed, done) = (failures.clone(), completed.clone(), done.clone());
        let url = format!("{}/healthz", hook.base);
        tokio::spawn(async move {
            while !done.is_cancelled() && completed.load(Ordering::SeqCst) < 5000 {
                match both.get(&url).send().await {
                    Ok(r) if r.status().is_success() => {}
                    Ok(r) => {
                        eprintln!("rotation: HTTP {}", r.status());
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => {
                        eprintln!("rotation: {e:?}");
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                }
                completed.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    // However slow the machine, rotate only once connections are flowing,
    // and stop only after more have been made with the new certificate.
    let wait_for = |n: usize| {
        let completed = completed.clone();
        async move {
            for _ in 0..1000 {
                if completed.load(Ordering::SeqCst) >= n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("the hammer made fewer than {n} requests in 10s");
        }
    };
    wait_for(5).await;
    // Rotate like a Secret update: write aside, then rename over.
    for name in ["tls.key", "tls.crt"] {
        let tmp = hook.certs.path().join(format!(".{name}.tmp"));
        std::fs::copy(next.path().join(name), &tmp).expect("copy");
        std::fs::rename(&tmp, hook.certs.path().join(name)).expect("rename");
    }
    let new_only = client_trusting(&new_ca);
    let mut rotated = false;
    for _ in 0..500 {
        if new_only
            .get(format!("{}/healthz", hook.base))
            .send()
            .await
            .is_ok()
        {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(rotated, "the new certificate is served");
    let after_rotation = completed.load(Ordering::SeqCst) + 5;
    wait_for(after_rotation).await;
    done.cancel();
    hammer.await.expect("hammer");
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "no request failed during rotation"
    );
    let old_only = client_trusting(&old_ca);
    assert!(
        old_only
            .get(format!("{}/healthz", hook.base))
            .send()
            .await
            .is_err(),
        "the old certificate is gone"
    );
}

#[tokio::test]
async fn a_pull_secret_not_in_the_namespace_yet_is_not_injected() {
    let env = token_env().await;
    let host = env.proxy.host.clone();
    let (_d, cfg) =
        docker_config(&json!({"auths": {host.clone(): {"auth": basic_auth("fn-user", PASSWORD)}}}));
    let body = serde_json::to_vec(&review(&host)).expect("json");
    for mode in [FailureMode::Open, FailureMode::Closed] {
        let (cache, _) = cached(&env.settings(&cfg), CacheSettings::default());
        let mut settings = admission_settings();
        settings.failure_mode = mode;
        // A mirror that has not seen the Secret (nor written it) yet.
        let status = Arc::new(fn_image_resolver::secrets::MirrorStatus::default());
        let admitter = Admitter::new(cache, settings).with_mirror(status);
        let answer = admitter.review(&body, None).await.expect("review");
        if mode == FailureMode::Closed {
            assert!(!answer.allowed());
            let message = answer.message().unwrap_or_default();
            assert!(message.contains("auth-secret"), "{message}");
            continue;
        }
        assert!(answer.allowed());
        let patch: Value = serde_json::from_slice(&answer.patch().expect("pinned")).expect("patch");
        assert!(!patch.to_string().contains("imagePullSecrets"), "{patch}");
        assert!(
            answer.warnings().iter().any(|w| w.contains("auth-secret")),
            "{:?}",
            answer.warnings()
        );
    }

    // Images that need no credentials are not held up by the secret.
    let plain = PlainEnv::start().await;
    let (cache, _) = cached(&plain.settings(), CacheSettings::default());
    let admitter = Admitter::new(cache, admission_settings())
        .with_mirror(Arc::new(fn_image_resolver::secrets::MirrorStatus::default()));
    let body = serde_json::to_vec(&review(&plain.proxy.host)).expect("json");
    let answer = admitter.review(&body, None).await.expect("review");
    assert!(answer.allowed() && answer.warnings().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_stops_mid_review_fails_open_with_a_warning() {
    let mut env = PlainEnv::start().await;
    let hook = webhook(&env.settings(), FailureMode::Open).await;
    // Manifests come back; the config fetch is slow and the registry dies meanwhile.
    env.proxy
        .set_fault(Fault::Delay(Duration::from_millis(700)), Some(Kind::Blob));
    let review = review(&env.proxy.host);
    let pending = {
        let client = hook.client.clone();
        let url = format!("{}/mutate?timeout=5s", hook.base);
        let body = review.clone();
        tokio::spawn(async move {
            client
                .post(url)
                .json(&body)
                .send()
                .await
                .expect("request")
                .json::<Value>()
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.registry.stop();
    let answer = pending.await.expect("join").expect("json");
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    let pod = patched(&review, &answer);
    assert_eq!(
        pod["spec"]["containers"], review["request"]["object"]["spec"]["containers"],
        "admitted as written"
    );
    assert!(
        answer["response"]["warnings"][0]
            .as_str()
            .is_some_and(|w| w.contains("admitted as written")),
        "{answer}"
    );
}

#[tokio::test]
async fn the_resolver_on_the_https_listener_needs_a_token() {
    let env = PlainEnv::start().await;
    let hook = webhook(&env.settings(), FailureMode::Open).await;
    let url = format!(
        "{}/v1/resolve?image={}/fns/set-namespace:v0.4",
        hook.base, env.proxy.host
    );
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Basic cmVzb2x2ZXI6eA=="),
        Some("Bearer "),
    ] {
        let mut req = hook.client.get(&url);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let resp = req.send().await.expect("request");
        assert_eq!(resp.status().as_u16(), 401, "{auth:?}");
        assert!(resp.headers().contains_key("www-authenticate"));
        let body = resp.text().await.expect("body");
        assert!(
            !body.contains("set-namespace") && !body.contains(&env.proxy.host),
            "no registry detail: {body}"
        );
    }
    assert_eq!(
        env.proxy.total(),
        0,
        "unauthenticated calls never reach a registry"
    );
    let resp = hook
        .client
        .get(&url)
        .bearer_auth(RESOLVER_TOKEN)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status().as_u16(), 200);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["digest"], env.samples.entrypoint.digest.as_str());

    // The resolver's body limit (256 KiB) holds here too, not the review's 4 MiB.
    let big = json!({"images": vec!["x".repeat(1024); 300]});
    let resp = hook
        .client
        .post(format!("{}/v1/resolve", hook.base))
        .bearer_auth(RESOLVER_TOKEN)
        .json(&big)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status().as_u16(), 413);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_rotated_by_the_kubelets_symlink_swap_is_served() {
    use crate::common::k8s::kubelet_swap_files;
    crate::common::init_crypto();
    let env = PlainEnv::start().await;
    let bundle = |dir: &std::path::Path| {
        fn_image_resolver::certs::write_bundle(dir, &["127.0.0.1".to_string()], false)
            .expect("certs");
        let read = |name: &str| std::fs::read(dir.join(name)).expect("read");
        (
            read("tls.crt"),
            read("tls.key"),
            String::from_utf8(read("ca.crt")).expect("pem"),
        )
    };
    let (first, second) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let (crt1, key1, ca1) = bundle(first.path());
    let (crt2, key2, ca2) = bundle(second.path());
    // The Secret volume as the kubelet lays it out.
    let mount = tempfile::tempdir().expect("mount");
    kubelet_swap_files(mount.path(), &[("tls.crt", &crt1), ("tls.key", &key1)], 1);
    let mut config = crate::serve_config(&env.settings(), CacheSettings::default());
    config.webhook = Some(WebhookConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        certificate: ServingCertificate::Files {
            cert: mount.path().join("tls.crt"),
            key: mount.path().join("tls.key"),
        },
        callers: Callers::Nobody,
    });
    let running = fn_image_resolver::app::start(config).await.expect("serve");
    let url = format!("https://{}/healthz", running.webhook_addr.expect("webhook"));
    let fresh = |ca: &str| {
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).expect("ca"))
            .tls_built_in_root_certs(false)
            .pool_max_idle_per_host(0)
            .build()
            .expect("client")
    };
    assert!(
        fresh(&ca1).get(&url).send().await.is_ok(),
        "the first certificate"
    );
    kubelet_swap_files(mount.path(), &[("tls.crt", &crt2), ("tls.key", &key2)], 2);
    let mut rotated = false;
    for _ in 0..250 {
        if fresh(&ca2).get(&url).send().await.is_ok() {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(rotated, "the swapped-in certificate is served");
    assert!(
        fresh(&ca1).get(&url).send().await.is_err(),
        "the old one is gone"
    );
}

#[tokio::test]
async fn closed_mode_keeps_definitive_codes_and_says_503_only_for_transient_failures() {
    let env = PlainEnv::start().await;
    let hook = webhook(&env.settings(), FailureMode::Closed).await;
    // The function image not found: 404, as in open mode.
    let mut missing = review(&env.proxy.host);
    missing["request"]["object"]["spec"]["containers"][0]["image"] =
        json!(format!("{}/fns/nope:v1", env.proxy.host));
    let (_, answer) = hook.post(&missing, "").await;
    assert_eq!(answer["response"]["allowed"], false);
    assert_eq!(answer["response"]["status"]["code"], 404, "{answer}");
    // An invalid reference: 400.
    let mut invalid = review(&env.proxy.host);
    invalid["request"]["object"]["spec"]["containers"][0]["image"] = json!("UPPER/Case:v1");
    let (_, answer) = hook.post(&invalid, "").await;
    assert_eq!(answer["response"]["status"]["code"], 400, "{answer}");
    // The wrapper-server image not found: the closed rule denies it, with
    // the definitive code.
    let mut wrapper = review(&env.proxy.host);
    wrapper["request"]["object"]["spec"]["initContainers"][0]["image"] =
        json!(format!("{}/nephio/nope:v1", env.proxy.host));
    let (_, answer) = hook.post(&wrapper, "").await;
    assert_eq!(answer["response"]["allowed"], false);
    assert_eq!(answer["response"]["status"]["code"], 404, "{answer}");
    assert!(
        answer["response"]["status"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("--failure-mode closed")),
        "{answer}"
    );
    // A registry that answers 500: transient, 503.
    env.proxy.set_fault(
        Fault::Status {
            code: 500,
            retry_after: None,
        },
        Some(Kind::Manifest),
    );
    let mut flaky = review(&env.proxy.host);
    flaky["request"]["object"]["spec"]["initContainers"][0]["image"] =
        json!(format!("{}/nephio/porch-wrapper-server:v5", env.proxy.host));
    let (_, answer) = hook.post(&flaky, "").await;
    assert_eq!(answer["response"]["status"]["code"], 503, "{answer}");
}

/// A review of a function pod with `n` more containers, each with an image
/// of its own (none exists).
fn big_review(registry: &str, n: usize) -> Value {
    let mut review = review(registry);
    let containers = review["request"]["object"]["spec"]["containers"]
        .as_array_mut()
        .expect("containers");
    for i in 0..n {
        containers
            .push(json!({"name": format!("c{i}"), "image": format!("{registry}/fns/x:t{i}")}));
    }
    review
}

#[tokio::test]
async fn a_pod_of_5000_containers_is_answered_within_its_budget_with_bounded_work() {
    let env = PlainEnv::start().await;
    let review = big_review(&env.proxy.host, 5000);
    let open = webhook(&env.settings(), FailureMode::Open).await;
    let started = std::time::Instant::now();
    let (status, answer) = open.post(&review, "?timeout=10s").await;
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "answered within the review's budget: {:?}",
        started.elapsed()
    );
    assert_eq!(status, 200);
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    let manifests = env
        .proxy
        .seen()
        .iter()
        .filter(|s| s.kind == Kind::Manifest)
        .count();
    assert!(manifests <= 32, "at most 32 images resolved: {manifests}");
    let warnings = answer["response"]["warnings"].as_array().expect("warnings");
    assert!(warnings.len() <= 16, "{}", warnings.len());
    assert!(
        warnings.iter().any(|w| w
            .as_str()
            .is_some_and(|w| w.contains("more than --max-images-per-review=32"))),
        "{warnings:?}"
    );
    let pod = patched(&review, &answer);
    assert!(
        pod["spec"]["containers"][0]["image"]
            .as_str()
            .is_some_and(|i| i.contains("@sha256:")),
        "the function is pinned first"
    );
    assert_eq!(
        pod["spec"]["containers"][4000]["image"],
        review["request"]["object"]["spec"]["containers"][4000]["image"]
    );
    let recorded = pod["metadata"]["annotations"][UNPINNED_ANNOTATION]
        .as_str()
        .unwrap_or_default();
    assert!(
        recorded.len() < 16 * 1024,
        "bounded: {} bytes",
        recorded.len()
    );

    let closed = webhook(&env.settings(), FailureMode::Closed).await;
    let (_, answer) = closed.post(&review, "?timeout=10s").await;
    assert_eq!(answer["response"]["allowed"], false);
    assert_eq!(answer["response"]["status"]["code"], 400, "{answer}");
}

#[tokio::test]
async fn containers_null_is_a_pod_allowed_as_it_is() {
    let env = PlainEnv::start().await;
    let hook = webhook(&env.settings(), FailureMode::Open).await;
    let mut null = review(&env.proxy.host);
    null["request"]["object"]["spec"]["containers"] = Value::Null;
    let (status, answer) = hook.post(&null, "").await;
    assert_eq!(status, 200);
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
}
