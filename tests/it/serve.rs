//! The resolver endpoint over real HTTP: answers, errors, bad input, health,
//! metrics; and the `serve` binary: loopback only, graceful shutdown.

use std::time::Duration;

use fn_image_resolver::cache::CacheSettings;
use serde_json::{Value, json};

use crate::common::proxy::Fault;
use crate::{Endpoint, PlainEnv};

/// GET `url`: its status and JSON body (`null` when it has none).
pub(crate) async fn get(url: &str) -> (u16, Value) {
    let resp = reqwest::get(url).await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn resolve_answers_with_the_cli_object_plus_cache_status() {
    let env = PlainEnv::start().await;
    let endpoint = Endpoint::start(&env.settings(), CacheSettings::default()).await;
    let image = env.image("fns/multi-arch:v1");
    let (status, body) = get(&endpoint.url(&image)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["digest"], env.samples.multi.digest.as_str());
    assert_eq!(body["entrypoint"], json!(["/fn-amd64"]));
    assert_eq!(body["cached"], "miss");
    let (_, body) = get(&endpoint.url(&image)).await;
    assert_eq!(body["cached"], "hit");
    let (_, body) = get(&format!("{}&platform=linux/arm64", endpoint.url(&image))).await;
    assert_eq!(body["entrypoint"], json!(["/fn-arm64"]));
    assert_eq!(body["platform"], "linux/arm64");

    let resp = reqwest::Client::new()
        .post(format!("{}/v1/resolve", endpoint.base))
        .json(&json!({"images": [image, env.image("fns/nope:v1"), "bad ref"]}))
        .send()
        .await
        .expect("batch");
    assert_eq!(resp.status().as_u16(), 200);
    let body: Value = resp.json().await.expect("json");
    let results = body["results"].as_array().expect("results");
    assert_eq!(results.len(), 3);
    assert_eq!(results[0]["cached"], "hit");
    assert_eq!(results[1]["error"]["kind"], "not-found");
    assert_eq!(results[2]["error"]["kind"], "invalid-reference");
}

#[tokio::test]
async fn errors_have_fitting_statuses_and_json_bodies() {
    let env = PlainEnv::start().await;
    let endpoint = Endpoint::start(&env.settings(), CacheSettings::default()).await;
    let (status, body) = get(&endpoint.url(&env.image("fns/nope:v1"))).await;
    assert_eq!(
        (status, body["error"]["kind"].as_str()),
        (404, Some("not-found"))
    );
    let (status, body) = get(&endpoint.url("Bad:Ref")).await;
    assert_eq!(
        (status, body["error"]["kind"].as_str()),
        (400, Some("invalid-reference"))
    );
    let (status, body) = get(&format!(
        "{}&platform=linux",
        endpoint.url(&env.image("fns/cmd-only:v1"))
    ))
    .await;
    assert_eq!(
        (status, body["error"]["kind"].as_str()),
        (400, Some("invalid-platform"))
    );

    env.proxy.set_fault(
        Fault::Status {
            code: 429,
            retry_after: Some(42),
        },
        None,
    );
    let resp = reqwest::get(endpoint.url(&env.image("fns/cmd-only:v1")))
        .await
        .expect("request");
    assert_eq!(resp.status().as_u16(), 429);
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("42")
    );
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["kind"], "rate-limited");
    assert_eq!(body["error"]["retryAfterSeconds"], 42);

    env.proxy.set_fault(
        Fault::Status {
            code: 500,
            retry_after: None,
        },
        None,
    );
    let (status, body) = get(&endpoint.url(&env.image("fns/no-entrypoint:v1"))).await;
    assert_eq!(
        (status, body["error"]["kind"].as_str()),
        (502, Some("registry-error"))
    );
}

#[tokio::test]
async fn bad_input_is_a_clear_4xx_never_a_panic() {
    let env = PlainEnv::start().await;
    let endpoint = Endpoint::start(&env.settings(), CacheSettings::default()).await;
    let base = &endpoint.base;
    let client = reqwest::Client::new();
    for (url, want) in [
        (format!("{base}/v1/resolve"), 400),
        (format!("{base}/v1/resolve?image="), 400),
        (format!("{base}/v1/resolve?image=%ZZ"), 400),
        (format!("{base}/v1/resolve?image={}", "a".repeat(5000)), 400),
        (format!("{base}/nope"), 404),
    ] {
        let resp = client.get(&url).send().await.expect("request");
        assert_eq!(
            resp.status().as_u16(),
            want,
            "{}",
            &url[..url.len().min(80)]
        );
        let body: Value = resp.json().await.expect("JSON error body");
        assert!(body["error"]["message"].is_string(), "{body}");
    }
    // A query far beyond any reference is refused by the HTTP layer itself.
    let status = match client
        .get(format!("{base}/v1/resolve?image={}", "a".repeat(60_000)))
        .send()
        .await
    {
        Ok(resp) => resp.status(),
        Err(e) => panic!(
            "huge query: {}",
            e.status().map(|s| s.to_string()).unwrap_or_default()
        ),
    };
    assert!(status.is_client_error(), "{status}");

    let post = |body: reqwest::Body, content_type: &'static str| {
        client
            .post(format!("{base}/v1/resolve"))
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let cases: Vec<(reqwest::Body, &str, u16)> = vec![
        ("not json".into(), "application/json", 400),
        (r#"{"images": "x"}"#.into(), "application/json", 400),
        (r#"{"images": []}"#.into(), "application/json", 400),
        (
            r#"{"images": ["a"], "extra": 1}"#.into(),
            "application/json",
            400,
        ),
        (r#"{"images": ["a"]}"#.into(), "text/plain", 415),
        (
            serde_json::to_string(&json!({"images": vec!["x"; 11]}))
                .expect("json")
                .into(),
            "application/json",
            400,
        ),
        (
            format!(r#"{{"images": ["{}"]}}"#, "a".repeat(300_000)).into(),
            "application/json",
            413,
        ),
    ];
    for (body, content_type, want) in cases {
        let resp = post(body, content_type).await.expect("request");
        assert_eq!(resp.status().as_u16(), want);
        let body: Value = resp.json().await.expect("JSON error body");
        assert!(body["error"]["kind"].is_string(), "{body}");
    }
    // Still serving after all that.
    let (status, _) = get(&endpoint.url(&env.image("fns/cmd-only:v1"))).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let env = PlainEnv::start().await;
    let endpoint = Endpoint::start(&env.settings(), CacheSettings::default()).await;
    let image = env.image("fns/cmd-only:v1");
    get(&endpoint.url(&image)).await;
    get(&endpoint.url(&image)).await;
    let healthz = reqwest::get(format!("{}/healthz", endpoint.base))
        .await
        .expect("healthz");
    assert_eq!(healthz.status().as_u16(), 200);
    let (status, ready) = get(&format!("{}/readyz", endpoint.base)).await;
    assert_eq!(status, 200);
    assert_eq!(ready["checks"]["resolver"]["ready"], true);
    let metrics = crate::metrics_text(&endpoint.base).await;
    for line in [
        "fn_image_resolver_cache_lookups_total{result=\"hit\"} 1",
        "fn_image_resolver_cache_lookups_total{result=\"miss\"} 1",
        "fn_image_resolver_cache_entries 1",
        "fn_image_resolver_http_requests_total{route=\"/v1/resolve\",outcome=\"200\"} 2",
        "kind=\"manifest\",status=\"200\"",
        "kind=\"blob\",status=\"200\"",
        "fn_image_resolver_http_request_duration_seconds_bucket",
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }
}

const BIN: &str = env!("CARGO_BIN_EXE_fn-image-resolver");

#[test]
fn the_plain_http_endpoint_refuses_non_loopback_addresses() {
    let out = std::process::Command::new(BIN)
        .args(["serve", "--resolver-listen", "0.0.0.0:0"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a loopback address"), "{stderr}");
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let env = PlainEnv::start().await;
    let port = crate::common::free_port();
    let mut child = tokio::process::Command::new(BIN)
        .args([
            "serve",
            "--resolver-listen",
            &format!("127.0.0.1:{port}"),
            "--insecure-registry",
            &env.proxy.host,
        ])
        .env("FN_IMAGE_RESOLVER_LOG_FORMAT", "json")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start serve");
    let base = format!("http://127.0.0.1:{port}");
    let mut ready = false;
    for _ in 0..200 {
        if reqwest::get(format!("{base}/readyz"))
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(ready, "serve became ready");

    let check = |path: &'static str| {
        let url = format!("{base}{path}");
        async move {
            tokio::process::Command::new(BIN)
                .args(["check", &url])
                .status()
                .await
                .expect("check")
                .code()
        }
    };
    assert_eq!(
        check("/readyz").await,
        Some(0),
        "the exec-probe helper sees a ready server"
    );
    assert_eq!(check("/nope").await, Some(1));

    env.proxy.set_delay(Duration::from_millis(800));
    let url = format!(
        "{base}/v1/resolve?image={}",
        env.image("fns/set-namespace:v0.4")
    );
    let in_flight =
        tokio::spawn(async move { reqwest::get(url).await.map(|r| r.status().as_u16()) });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pid = child.id().expect("pid").to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(kill.success());

    assert_eq!(
        in_flight
            .await
            .expect("join")
            .expect("in-flight request completed"),
        200
    );
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits after draining")
        .expect("wait");
    assert_eq!(status.code(), Some(0));
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use tokio::io::AsyncReadExt as _;
        let _ = e.read_to_string(&mut stderr).await;
    }
    let last: Value = stderr
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .expect("JSON log lines");
    assert_eq!(last["message"], "stopped", "{stderr}");
}

#[tokio::test]
async fn a_resolution_whose_caller_gave_up_still_fills_the_cache() {
    use crate::common::proxy::Kind;
    let env = PlainEnv::start().await;
    let endpoint = Endpoint::start(&env.settings(), CacheSettings::default()).await;
    env.proxy.set_fault(
        Fault::Delay(Duration::from_millis(800)),
        Some(Kind::Manifest),
    );
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .expect("client");
    let image = env.image("fns/set-namespace:v0.4");
    assert!(
        impatient.get(endpoint.url(&image)).send().await.is_err(),
        "the caller gave up first"
    );
    // The fetch goes on without it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    env.proxy.set_fault(Fault::None, None);
    let requests = env.proxy.total();
    let (status, body) = get(&endpoint.url(&image)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["cached"], "hit", "{body}");
    assert_eq!(env.proxy.total(), requests, "no second fetch");
}

#[tokio::test]
async fn images_warmed_at_start_up_are_cache_hits_without_a_cluster() {
    let env = PlainEnv::start().await;
    let listed = env.image("fns/set-namespace:v0.4");
    let in_file = env.image("fns/cmd-only:v1");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("images");
    std::fs::write(
        &file,
        format!(
            "# warm these\n{in_file}\n\n{}/fns/nope:v1  # not there\n",
            env.proxy.host
        ),
    )
    .expect("write");
    let mut config = crate::serve_config(&env.settings(), CacheSettings::default());
    config.prewarm = fn_image_resolver::prewarm::PrewarmSettings {
        images: vec![listed.clone()],
        file: Some(file),
        pods: None,
        timeout: Duration::from_secs(30),
    };
    let running = fn_image_resolver::app::start(config).await.expect("serve");
    let base = format!("http://{}", running.resolver_addr);
    let ready = crate::e2e::wait_ready(&format!("{base}/readyz")).await;
    assert_eq!(ready["checks"]["prewarm"]["ready"], true, "{ready}");
    let requests = env.proxy.total();
    assert!(requests >= 4, "both images were fetched before ready");
    for image in [&listed, &in_file] {
        let url = format!("{base}/v1/resolve?image={image}");
        let (status, body) = get(&url).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["cached"], "hit", "{image}: {body}");
    }
    assert_eq!(env.proxy.total(), requests, "nothing fetched after ready");
    let metrics = crate::metrics_text(&base).await;
    assert!(
        metrics.contains("fn_image_resolver_prewarm_images_total{result=\"cached\"} 2")
            && metrics.contains("fn_image_resolver_prewarm_images_total{result=\"failed\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn warming_past_its_timeout_stops_holding_readiness_and_goes_on() {
    use crate::common::proxy::Kind;
    let env = PlainEnv::start().await;
    let image = env.image("fns/set-namespace:v0.4");
    env.proxy.set_fault(
        Fault::Delay(Duration::from_millis(1500)),
        Some(Kind::Manifest),
    );
    let mut config = crate::serve_config(&env.settings(), CacheSettings::default());
    config.prewarm = fn_image_resolver::prewarm::PrewarmSettings {
        images: vec![image.clone()],
        file: None,
        pods: None,
        timeout: Duration::from_millis(200),
    };
    let running = fn_image_resolver::app::start(config).await.expect("serve");
    let base = format!("http://{}", running.resolver_addr);
    let ready = crate::e2e::wait_ready(&format!("{base}/readyz")).await;
    assert_eq!(ready["checks"]["prewarm"]["ready"], true, "{ready}");
    let warmed = "fn_image_resolver_prewarm_images_total{result=\"cached\"} 1";
    assert!(
        !crate::metrics_text(&base).await.contains(warmed),
        "ready before the slow image was warmed"
    );
    // The warming goes on past the timeout and fills the cache.
    let mut metrics = String::new();
    for _ in 0..100 {
        metrics = crate::metrics_text(&base).await;
        if metrics.contains(warmed) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(metrics.contains(warmed), "{metrics}");
    env.proxy.set_fault(Fault::None, None);
    let requests = env.proxy.total();
    let (status, body) = get(&format!("{base}/v1/resolve?image={image}")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["cached"], "hit", "{body}");
    assert_eq!(env.proxy.total(), requests, "no second fetch");
}
