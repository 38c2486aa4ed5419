//! One sweep over everything the process says: with unique marker strings as
//! passwords, identity tokens, caller tokens and broken config content, drive
//! the success and error paths of the `serve` binary (debug JSON logs) and
//! assert that no marker, no bearer token (JWT) and no Basic header value
//! appears in any log line, HTTP response or metric.

use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt as _;

use crate::common::proxy::{Fault, Kind, Proxy};
use crate::resolve_auth::{PASSWORD, REFRESH, token_env};
use crate::{basic_auth, docker_config};

const WRONG_PASSWORD: &str = "wrong-PASSWORD-marker-7c1";
const WRONG_REFRESH: &str = "wrong-REFRESH-marker-9d2";
const CALLER_TOKEN: &str = "caller-TOKEN-marker-3e4";
const WRONG_CALLER: &str = "wrong-CALLER-marker-5f6";
const BROKEN: &str = "broken-CONFIG-marker-8a0";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_appears_in_logs_responses_or_metrics() {
    let env = token_env().await;
    let registry = env.registry.url();
    let good = env.proxy.host.clone();
    let refresh = Proxy::start(&registry).await;
    let wrong = Proxy::start(&registry).await;
    let wrong_refresh = Proxy::start(&registry).await;
    let config = json!({"auths": {
        good.clone(): {"username": "fn-user", "password": PASSWORD},
        refresh.host.clone(): {"username": "<token>", "identitytoken": REFRESH},
        wrong.host.clone(): {"auth": basic_auth("fn-user", WRONG_PASSWORD)},
        wrong_refresh.host.clone(): {"identitytoken": WRONG_REFRESH},
    }});
    let (cfg_dir, cfg) = docker_config(&config);
    let certs = crate::common::loopback_certs();
    std::fs::write(
        certs.path().join("callers"),
        format!("{CALLER_TOKEN},porch\n"),
    )
    .expect("token file");
    let insecure = [
        good.clone(),
        refresh.host.clone(),
        wrong.host.clone(),
        wrong_refresh.host.clone(),
        format!("127.0.0.1:{}", env.tokens.port),
    ]
    .join(",");
    let port = crate::common::free_port();
    let resolver_port = crate::common::free_port();
    let mut child = crate::serve_command(certs.path(), port, resolver_port)
        .arg(format!(
            "--resolver-token-file={}",
            certs.path().join("callers").display()
        ))
        .arg("--enable-private-registries=true")
        .arg("--mirror-secret=false")
        .arg(format!("--registry-auth-secret-path={}", cfg.display()))
        .args(["--log-format", "json", "--log-level", "debug"])
        .env("FN_IMAGE_RESOLVER_INSECURE_REGISTRY", &insecure)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start serve");
    let local = format!("http://127.0.0.1:{resolver_port}");
    crate::e2e::wait_ready(&format!("{local}/readyz")).await;
    let ca = std::fs::read_to_string(certs.path().join("ca.crt")).expect("ca");
    let https = crate::client_trusting(&ca);
    let mut said = String::new();
    let mut statuses = Vec::new();
    let mut record = |what: &str, resp: (u16, String, String)| {
        statuses.push((what.to_string(), resp.0));
        said.push_str(&resp.1);
        said.push_str(&resp.2);
        said.push('\n');
    };
    async fn read(resp: reqwest::Response) -> (u16, String, String) {
        let status = resp.status().as_u16();
        let headers = format!("{:?}", resp.headers());
        let mut body = resp.text().await.unwrap_or_default();
        // An AdmissionReview's patch is base64: scan what it says, which is
        // also where a leaked credential would be (and base64 text can hold
        // "eyJ" by chance).
        if let Ok(mut review) = serde_json::from_str::<Value>(&body)
            && let Some(patch) = review["response"]["patch"].as_str()
        {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(patch)
                .expect("the patch is base64");
            review["response"]["patch"] = json!(String::from_utf8_lossy(&decoded));
            body = review.to_string();
        }
        (status, headers, body)
    }
    let resolve = |host: &str, path: &str| {
        let url = format!("{local}/v1/resolve?image={host}/{path}");
        async move { read(reqwest::get(url).await.expect("resolve")).await }
    };

    record("good", resolve(&good, "fns/set-namespace:v0.4").await);
    record("good, missing repo", resolve(&good, "fns/nope:v1").await);
    record("refresh", resolve(&refresh.host, "fns/cmd-only:v1").await);
    record(
        "wrong password",
        resolve(&wrong.host, "fns/set-namespace:v0.4").await,
    );
    record(
        "wrong refresh token",
        resolve(&wrong_refresh.host, "fns/set-namespace:v0.4").await,
    );
    env.proxy.set_fault(
        Fault::Status {
            code: 500,
            retry_after: None,
        },
        Some(Kind::Manifest),
    );
    record("registry 500", resolve(&good, "fns/multi-arch:v1").await);
    env.proxy.set_fault(Fault::None, None);

    for (what, host) in [
        ("review, good", &good),
        ("review, wrong password", &wrong.host),
    ] {
        let body = crate::common::function_pod_review(host, host);
        let resp = https
            .post(format!("https://127.0.0.1:{port}/mutate?timeout=10s"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("review");
        record(what, read(resp).await);
    }
    for (what, token) in [("caller", CALLER_TOKEN), ("wrong caller", WRONG_CALLER)] {
        let resp = https
            .get(format!("https://127.0.0.1:{port}/v1/resolve"))
            .query(&[("image", format!("{good}/fns/set-namespace:v0.4"))])
            .bearer_auth(token)
            .send()
            .await
            .expect("resolve over https");
        record(what, read(resp).await);
    }

    // A config that breaks while running: logged, old credentials kept.
    std::fs::write(
        &cfg,
        format!("{{\"auths\": {{\"{good}\": {{\"password\": \"{BROKEN}\""),
    )
    .expect("break config");
    tokio::time::sleep(Duration::from_millis(500)).await;
    std::fs::write(
        &cfg,
        json!({"auths": {good.clone(): {"auth": format!("{BROKEN}!!")}}}).to_string(),
    )
    .expect("bad auth value");
    tokio::time::sleep(Duration::from_millis(500)).await;
    record(
        "after broken config",
        resolve(&good, "fns/set-namespace:v0.4").await,
    );
    record(
        "metrics",
        read(
            reqwest::get(format!("{local}/metrics"))
                .await
                .expect("metrics"),
        )
        .await,
    );

    let pid = child.id().expect("pid").to_string();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    let _ = tokio::time::timeout(Duration::from_secs(20), child.wait()).await;
    let mut logs = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut logs).await;
    }
    drop(cfg_dir);

    // The paths really ran: each answered as expected, and the logs saw them.
    let status = |what: &str| {
        statuses
            .iter()
            .find(|(w, _)| w == what)
            .map(|(_, s)| *s)
            .unwrap_or_default()
    };
    assert_eq!(status("good"), 200, "{statuses:?}");
    assert_eq!(status("good, missing repo"), 404, "{statuses:?}");
    assert_eq!(status("refresh"), 200, "{statuses:?}");
    assert_eq!(status("wrong password"), 502, "{statuses:?}");
    assert_eq!(status("wrong refresh token"), 502, "{statuses:?}");
    assert_eq!(status("registry 500"), 502, "{statuses:?}");
    assert_eq!(status("caller"), 200, "{statuses:?}");
    assert_eq!(status("wrong caller"), 401, "{statuses:?}");
    assert_eq!(status("after broken config"), 200, "{statuses:?}");
    assert!(said.contains("unauthorized"), "{said}");
    for line in logs.lines() {
        let _: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
    }
    assert!(
        logs.contains("keeping the last good Docker config"),
        "the broken config was noticed: {logs}"
    );
    assert!(logs.lines().count() > 10, "{logs}");

    let basic_value =
        base64::engine::general_purpose::STANDARD.encode(format!("fn-user:{PASSWORD}"));
    for secret in [
        PASSWORD,
        REFRESH,
        WRONG_PASSWORD,
        WRONG_REFRESH,
        CALLER_TOKEN,
        WRONG_CALLER,
        BROKEN,
        basic_value.as_str(),
        // Every bearer token is a JWT: base64 of `{"` starts with this.
        "eyJ",
    ] {
        for (where_, text) in [("logs", &logs), ("responses and metrics", &said)] {
            if let Some(at) = text.find(secret) {
                let start = at.saturating_sub(200);
                panic!(
                    "{secret:?} appears in the {where_}: …{}…",
                    &text[start..(at + secret.len() + 100).min(text.len())]
                );
            }
        }
    }
}
