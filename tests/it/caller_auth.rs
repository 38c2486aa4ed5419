//! The resolver on the HTTPS listener in a cluster: callers are identified by
//! the real API server (TokenReview), checked against the allowed subjects,
//! and may only ask about allowlisted registries. Runs as the deploy's
//! ServiceAccount with the component's RBAC.

use std::process::Stdio;

use serde_json::Value;

use crate::PlainEnv;
use crate::common::k8s::{ADMIN_TOKEN, ControlPlane, USER_TOKEN};
use crate::e2e::kubectl;

const SERVICE_ACCOUNT: &str = "system:serviceaccount:porch-system:fn-image-resolver";
const CALLER: &str = "system:serviceaccount:porch-system:porch-fn-runner";

#[tokio::test]
async fn token_review_admits_allowed_subjects_only_and_the_allowlist_holds() {
    let plane = ControlPlane::start();
    plane.create_namespace("porch-system").await;
    let admin = plane.kubeconfig(ADMIN_TOKEN, "admin");
    let root = env!("CARGO_MANIFEST_DIR");
    let (ok, out) = kubectl(
        &admin,
        &[
            "apply",
            "-f",
            &format!("{root}/deploy/components/resolver-token-review/rbac.yaml"),
        ],
    );
    assert!(ok, "{out}");
    let (ok, out) = kubectl(
        &admin,
        &[
            "create",
            "serviceaccount",
            "porch-fn-runner",
            "-n",
            "porch-system",
        ],
    );
    assert!(ok, "{out}");
    // Tokens for our audience, and one for the API server's own.
    let token_for = |sa: &str, audience: Option<&str>| {
        let mut args = vec!["create", "token", sa, "-n", "porch-system"];
        if let Some(audience) = audience {
            args.extend(["--audience", audience]);
        }
        let (ok, token) = kubectl(&admin, &args);
        assert!(ok, "{token}");
        token.trim().to_string()
    };
    let caller_token = token_for("porch-fn-runner", Some("fn-image-resolver"));
    let other_audience = token_for("porch-fn-runner", None);

    let env = PlainEnv::start().await;
    let certs = crate::common::loopback_certs();
    let port = crate::common::free_port();
    let resolver_port = crate::common::free_port();
    let serve = |extra: &[&str]| {
        crate::serve_command(certs.path(), port, resolver_port)
            .args(["--insecure-registry", &env.proxy.host])
            .arg("--resolver-token-review=true")
            .args(extra)
            .env(
                "KUBECONFIG",
                plane.kubeconfig_as(SERVICE_ACCOUNT, &["system:serviceaccounts"]),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start serve")
    };

    // Without allowed subjects it refuses to start rather than open up.
    let refused = serve(&[]).wait_with_output().await.expect("wait");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--resolver-allowed-subjects"), "{stderr}");

    let (ok, out) = kubectl(
        &admin,
        &["create", "serviceaccount", "gone", "-n", "porch-system"],
    );
    assert!(ok, "{out}");
    let _running = serve(&[
        &format!("--resolver-allowed-subjects={CALLER},system:serviceaccount:porch-system:gone"),
        &format!("--resolver-allowed-registries={}", env.proxy.host),
        "--resolver-token-audiences=fn-image-resolver",
        "--resolver-token-review-ttl=2s",
    ]);
    crate::e2e::wait_ready(&format!("http://127.0.0.1:{resolver_port}/readyz")).await;
    let ca = std::fs::read_to_string(certs.path().join("ca.crt")).expect("ca");
    let client = crate::client_trusting(&ca);
    let image = env.image("fns/set-namespace:v0.4");
    let ask = |image: String, token: Option<String>| {
        let client = client.clone();
        async move {
            let mut req = client
                .get(format!("https://127.0.0.1:{port}/v1/resolve"))
                .query(&[("image", image)]);
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let resp = req.send().await.expect("request");
            let status = resp.status().as_u16();
            let body = resp.text().await.expect("body");
            (status, body)
        }
    };

    env.proxy.reset();
    let (status, body) = ask(image.clone(), None).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = ask(image.clone(), Some("not-a-token".into())).await;
    assert_eq!(status, 401, "{body}");
    // A static token is for the API server's own audience only.
    let (status, body) = ask(image.clone(), Some(USER_TOKEN.into())).await;
    assert_eq!(status, 401, "{body}");
    // A real identity with a token for us, but not an allowed one.
    let (ok, out) = kubectl(
        &admin,
        &["create", "serviceaccount", "stranger", "-n", "porch-system"],
    );
    assert!(ok, "{out}");
    let stranger = token_for("stranger", Some("fn-image-resolver"));
    let (status, body) = ask(image.clone(), Some(stranger)).await;
    assert_eq!(status, 403, "{body}");
    let refusal: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(refusal["error"]["kind"], "forbidden");
    assert!(
        !body.contains(&env.proxy.host) && !body.contains("set-namespace"),
        "refusals say nothing about registries: {body}"
    );
    // The allowed caller, on a registry outside the allowlist.
    let (status, body) = ask(
        "127.0.0.1:1/fns/probe:v1".into(),
        Some(caller_token.clone()),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let refusal: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(refusal["error"]["kind"], "registry-not-allowed");
    assert_eq!(
        env.proxy.total(),
        0,
        "no refused request reached a registry"
    );

    let (status, body) = ask(image.clone(), Some(caller_token.clone())).await;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(answer["digest"], env.samples.entrypoint.digest.as_str());
    // The same caller with a token meant for another audience: refused.
    let (status, body) = ask(image.clone(), Some(other_audience)).await;
    assert_eq!(status, 401, "{body}");

    // A caller whose verdict is cached, then its ServiceAccount deleted: the
    // cached acceptance holds for --resolver-token-review-ttl, no longer.
    let gone_token = token_for("gone", Some("fn-image-resolver"));
    let (status, body) = ask(image.clone(), Some(gone_token.clone())).await;
    assert_eq!(status, 200, "{body}");
    let (ok, out) = kubectl(
        &admin,
        &["delete", "serviceaccount", "gone", "-n", "porch-system"],
    );
    assert!(ok, "{out}");
    let deleted = std::time::Instant::now();
    let (status, body) = ask(image.clone(), Some(gone_token.clone())).await;
    if deleted.elapsed() < std::time::Duration::from_secs(2) {
        assert_eq!(
            status, 200,
            "within the TTL the cached verdict stands: {body}"
        );
    }
    // The API server caches its own token verdicts for 10 s; past both, the
    // deletion is seen (with the old fixed 30 s verdict cache, not within 20 s).
    let mut last = (0, String::new());
    while deleted.elapsed() < std::time::Duration::from_secs(20) {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        last = ask(image.clone(), Some(gone_token.clone())).await;
        if last.0 == 401 {
            break;
        }
    }
    assert_eq!(
        last.0, 401,
        "past the TTLs the API server is asked again: {}",
        last.1
    );
}

/// A stand-in for the API server's TokenReview endpoint that checks the call
/// shape only: how many reviews are in flight at once, and what they carry.
/// (What a real API server answers is tested above.)
#[derive(Default)]
struct ReviewLog {
    in_flight: std::sync::atomic::AtomicUsize,
    max_in_flight: std::sync::atomic::AtomicUsize,
    tokens: std::sync::Mutex<Vec<String>>,
    audiences: std::sync::Mutex<Vec<Value>>,
}

async fn fake_token_reviews(log: std::sync::Arc<ReviewLog>) -> String {
    use std::sync::atomic::Ordering;
    let app = axum::Router::new().route(
        "/apis/authentication.k8s.io/v1/tokenreviews",
        axum::routing::post(move |axum::Json(review): axum::Json<Value>| {
            let log = log.clone();
            async move {
                let now = log.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                log.max_in_flight.fetch_max(now, Ordering::SeqCst);
                let token = review["spec"]["token"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                log.tokens.lock().expect("log").push(token.clone());
                log.audiences
                    .lock()
                    .expect("log")
                    .push(review["spec"]["audiences"].clone());
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                log.in_flight.fetch_sub(1, Ordering::SeqCst);
                let status = if token == "good" {
                    serde_json::json!({"authenticated": true, "user": {"username": CALLER}})
                } else {
                    serde_json::json!({"authenticated": false})
                };
                axum::Json(serde_json::json!({
                    "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                    "spec": review["spec"], "status": status
                }))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_reviews_are_bounded_in_flight_carry_the_audiences_and_refusals_are_cached() {
    use fn_image_resolver::server::auth::{Authenticator, TokenReviewSettings, TokenReviewer};
    use std::sync::atomic::Ordering;

    let log = std::sync::Arc::new(ReviewLog::default());
    let api = fake_token_reviews(log.clone()).await;
    let config = kube::Config::new(api.parse().expect("url"));
    let client = kube::Client::try_from(config).expect("client");
    let reviewer = TokenReviewer::new(
        client,
        TokenReviewSettings {
            allowed_subjects: vec![CALLER.into()],
            audiences: vec!["fn-image-resolver".into()],
            verdict_ttl: std::time::Duration::from_secs(30),
        },
    );
    let env = PlainEnv::start().await;
    let mut config = crate::serve_config(&env.settings(), Default::default());
    config.resolver_allowed_registries = vec![env.proxy.host.clone()];
    let running = fn_image_resolver::app::start(config).await.expect("serve");
    let state = std::sync::Arc::new(fn_image_resolver::server::AppState {
        admitter: fn_image_resolver::admission::Admitter::new(
            running.cache.clone(),
            crate::admission_settings(),
        ),
        cache: running.cache.clone(),
        metrics: running.metrics.clone(),
        readiness: running.readiness.clone(),
        max_batch: 10,
        allowed_registries: vec![env.proxy.host.clone()],
        request_timeout: std::time::Duration::from_secs(30),
    });
    let router = fn_image_resolver::server::webhook_router(
        state,
        Some(Authenticator::TokenReview(Box::new(reviewer))),
    );
    let ask = |token: String| {
        let router = router.clone();
        async move {
            use tower::ServiceExt as _;
            let request = axum::http::Request::get("/v1/resolve?image=127.0.0.1:1/fns/x:v1")
                .header("authorization", format!("Bearer {token}"))
                .body(axum::body::Body::empty())
                .expect("request");
            router
                .oneshot(request)
                .await
                .expect("answer")
                .status()
                .as_u16()
        }
    };

    // Twenty unknown callers at once: never more than a few reviews in flight.
    let statuses =
        futures_util::future::join_all((0..20).map(|i| ask(format!("unknown-{i}")))).await;
    assert!(
        statuses.iter().all(|s| *s == 401 || *s == 503),
        "{statuses:?}"
    );
    let max = log.max_in_flight.load(Ordering::SeqCst);
    assert!(
        (1..=4).contains(&max),
        "{max} TokenReviews in flight at once"
    );
    assert!(
        statuses.contains(&503),
        "the ones over the bound were told to retry"
    );

    // The same unknown token again and again: one review.
    let before = log.tokens.lock().expect("log").len();
    for _ in 0..5 {
        assert_eq!(ask("repeated".into()).await, 401);
    }
    let reviews = log
        .tokens
        .lock()
        .expect("log")
        .iter()
        .filter(|t| *t == "repeated")
        .count();
    assert_eq!(reviews, 1, "the refusal is reused");
    assert_eq!(log.tokens.lock().expect("log").len(), before + 1);

    // The allowed caller passes (then the registry allowlist answers).
    assert_eq!(ask("good".into()).await, 403);
    assert_eq!(ask("good".into()).await, 403);
    assert_eq!(
        log.tokens
            .lock()
            .expect("log")
            .iter()
            .filter(|t| *t == "good")
            .count(),
        1
    );
    // Every review named the configured audiences.
    assert!(
        log.audiences
            .lock()
            .expect("log")
            .iter()
            .all(|a| *a == serde_json::json!(["fn-image-resolver"]))
    );
}
