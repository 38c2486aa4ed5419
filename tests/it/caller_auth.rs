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
    let (ok, caller_token) = kubectl(
        &admin,
        &["create", "token", "porch-fn-runner", "-n", "porch-system"],
    );
    assert!(ok, "{caller_token}");
    let caller_token = caller_token.trim().to_string();

    let env = PlainEnv::start().await;
    let certs = tempfile::tempdir().expect("tempdir");
    fn_image_resolver::certs::write_bundle(certs.path(), &["127.0.0.1".to_string()], false)
        .expect("certs");
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

    let _running = serve(&[
        &format!("--resolver-allowed-subjects={CALLER}"),
        &format!("--resolver-allowed-registries={}", env.proxy.host),
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
    // A real identity (the API server knows it), but not an allowed one.
    let (status, body) = ask(image.clone(), Some(USER_TOKEN.into())).await;
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

    // The token of a ServiceAccount that is gone is refused (TokenReview
    // says so; nothing about it was cached).
    let (ok, out) = kubectl(
        &admin,
        &["create", "serviceaccount", "gone", "-n", "porch-system"],
    );
    assert!(ok, "{out}");
    let (ok, gone_token) = kubectl(&admin, &["create", "token", "gone", "-n", "porch-system"]);
    assert!(ok, "{gone_token}");
    let (ok, out) = kubectl(
        &admin,
        &["delete", "serviceaccount", "gone", "-n", "porch-system"],
    );
    assert!(ok, "{out}");
    let (status, body) = ask(image, Some(gone_token.trim().to_string())).await;
    assert_eq!(status, 401, "{body}");
}
