//! Credentials: htpasswd Basic auth over TLS, and bearer tokens from a token
//! server (how Docker Hub, GHCR, Harbor and Quay work).

use serde_json::json;

use fn_image_resolver::registry::{ErrorKind, Resolver};

use crate::common::oci::{Pusher, Samples, samples};
use crate::common::proxy::{Kind, Proxy};
use crate::common::registry::{Auth, Registry, tls_pair};
use crate::common::token::{ISSUER, SERVICE, TokenServer};
use crate::{basic_auth, docker_config, resolver, settings};

pub const PASSWORD: &str = "s3cret-PASSWORD-marker";
pub const REFRESH: &str = "refresh-TOKEN-marker";

#[derive(Debug)]
struct BasicEnv {
    registry: Registry,
    ca: tempfile::TempDir,
    samples: Samples,
}

async fn basic_env() -> BasicEnv {
    crate::common::init_crypto();
    let (ca, issued) = tls_pair("basic-auth registry CA");
    let registry = Registry::start(
        Some(&issued),
        Auth::Basic {
            user: "fn-user".into(),
            pass: PASSWORD.into(),
        },
    );
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.cert_pem().as_bytes()).expect("ca"))
        .build()
        .expect("client");
    let samples = samples();
    samples
        .push(&Pusher::new(registry.url(), client).basic("fn-user", PASSWORD))
        .await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("ca.crt"), ca.cert_pem()).expect("ca.crt");
    BasicEnv {
        registry,
        ca: dir,
        samples,
    }
}

impl BasicEnv {
    fn settings(&self, config: &std::path::Path) -> fn_image_resolver::registry::ResolverSettings {
        let mut s = settings();
        s.private_registries = true;
        s.docker_config_path = config.to_path_buf();
        s.tls_ca_dir = Some(self.ca.path().to_path_buf());
        s
    }
}

#[tokio::test]
async fn basic_auth_with_docker_config_credentials() {
    let env = basic_env().await;
    let host = env.registry.host.clone();
    let image = format!("{host}/fns/set-namespace:v0.4");

    let (_d, good) =
        docker_config(&json!({"auths": {host.clone(): {"auth": basic_auth("fn-user", PASSWORD)}}}));
    let got = resolver(&env.settings(&good))
        .resolve(&image, None)
        .await
        .expect("resolves");
    assert_eq!(got.digest, env.samples.entrypoint.digest);
    assert_eq!(got.pull_secret.as_deref(), Some("auth-secret"));

    // username/password fields and an https:// key spelling work the same.
    let (_d, fields) = docker_config(
        &json!({"auths": {format!("https://{host}"): {"username": "fn-user", "password": PASSWORD}}}),
    );
    let got = resolver(&env.settings(&fields))
        .resolve(&image, None)
        .await
        .expect("resolves");
    assert_eq!(got.digest, env.samples.entrypoint.digest);

    let (_d, wrong) = docker_config(
        &json!({"auths": {host.clone(): {"auth": basic_auth("fn-user", "wrong-pass")}}}),
    );
    let err = resolver(&env.settings(&wrong))
        .resolve(&image, None)
        .await
        .expect_err("wrong password");
    assert_eq!(err.kind(), ErrorKind::Unauthorized);
    assert!(err.to_string().contains("not accepted"), "{err}");

    let (_d, other) = docker_config(
        &json!({"auths": {"other.example.com": {"auth": basic_auth("fn-user", PASSWORD)}}}),
    );
    let r = resolver(&env.settings(&other));
    let err = r
        .resolve(&image, None)
        .await
        .expect_err("no credentials for this host");
    assert_eq!(err.kind(), ErrorKind::Unauthorized);
    let msg = err.to_string();
    assert!(msg.contains("no credentials are configured"), "{msg}");
    assert!(!msg.contains(PASSWORD), "{msg}");

    // Private registries disabled: anonymous, as the seed says, even with a config.
    let mut s = env.settings(&good);
    s.private_registries = false;
    let err = resolver(&s)
        .resolve(&image, None)
        .await
        .expect_err("anonymous");
    assert_eq!(err.kind(), ErrorKind::Unauthorized);
}

#[tokio::test]
async fn broken_docker_configs_are_clear_startup_errors_without_secrets() {
    crate::common::init_crypto();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(".dockerconfigjson");
    std::fs::write(
        &path,
        format!("{{\"auths\": {{\"r.io\": {{\"auth\": \"{PASSWORD}\""),
    )
    .expect("write");
    let mut s = settings();
    s.private_registries = true;
    s.docker_config_path = path.clone();
    let msg = Resolver::new(&s).expect_err("truncated JSON").to_string();
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("not valid JSON"),
        "{msg}"
    );
    assert!(!msg.contains(PASSWORD), "{msg}");

    s.docker_config_path = dir.path().join("missing.json");
    let msg = Resolver::new(&s).expect_err("missing").to_string();
    assert!(msg.contains("missing.json"), "{msg}");
}

#[derive(Debug)]
pub struct TokenEnv {
    pub registry: Registry,
    pub proxy: Proxy,
    pub tokens: TokenServer,
    pub samples: Samples,
}

/// A token-auth registry (plain HTTP behind the counting proxy) and its token server.
pub async fn token_env() -> TokenEnv {
    crate::common::init_crypto();
    let tokens = TokenServer::start(&[("fn-user", PASSWORD)], &[(REFRESH, "fn-user")], false).await;
    let registry = Registry::start(
        None,
        Auth::Token {
            realm: tokens.realm(),
            service: SERVICE.into(),
            issuer: ISSUER.into(),
            root_pem: tokens.root_pem.clone(),
        },
    );
    let samples = samples();
    let scope = [
        "fns/set-namespace",
        "fns/cmd-only",
        "fns/no-entrypoint",
        "fns/multi-arch",
        "nephio/porch-wrapper-server",
    ]
    .map(|r| format!("repository:{r}:pull,push"))
    .join(" ");
    let push_token = tokens.issue("pusher", &scope);
    samples
        .push(&Pusher::new(registry.url(), reqwest::Client::new()).bearer(&push_token))
        .await;
    let proxy = Proxy::start(&registry.url()).await;
    TokenEnv {
        registry,
        proxy,
        tokens,
        samples,
    }
}

impl TokenEnv {
    pub fn settings(
        &self,
        config: &std::path::Path,
    ) -> fn_image_resolver::registry::ResolverSettings {
        let mut s = settings();
        s.private_registries = true;
        s.docker_config_path = config.to_path_buf();
        s.insecure_hosts = vec![
            self.proxy.host.clone(),
            format!("127.0.0.1:{}", self.tokens.port),
        ];
        s
    }
}

#[tokio::test]
async fn bearer_tokens_are_fetched_once_per_repository_and_reused() {
    let env = token_env().await;
    let host = env.proxy.host.clone();
    let (_d, cfg) =
        docker_config(&json!({"auths": {host.clone(): {"auth": basic_auth("fn-user", PASSWORD)}}}));
    let r = resolver(&env.settings(&cfg));

    let got = r
        .resolve(&format!("{host}/fns/set-namespace:v0.4"), None)
        .await
        .expect("resolves");
    assert_eq!(got.digest, env.samples.entrypoint.digest);
    assert_eq!(got.pull_secret.as_deref(), Some("auth-secret"));
    // First contact: the manifest GET collects the challenge (401), one token,
    // the manifest again, the config.
    assert_eq!(env.tokens.count(), 1);
    assert_eq!(env.proxy.count("GET", Kind::Manifest), 2);
    assert_eq!(env.proxy.count("GET", Kind::Blob), 1);
    assert_eq!(env.proxy.total(), 3);

    // Another repository: the host's realm is known, so the token is fetched
    // up front and no request is refused first.
    env.proxy.reset();
    let got = r
        .resolve(&format!("{host}/fns/multi-arch:v1"), None)
        .await
        .expect("resolves");
    assert_eq!(got.digest, env.samples.multi.digest);
    assert_eq!(env.tokens.count(), 2);
    assert_eq!(
        env.proxy.total(),
        3,
        "index, platform manifest, config: {:?}",
        env.proxy.seen()
    );

    // The same repository again: the token is reused.
    env.proxy.reset();
    r.resolve(&format!("{host}/fns/set-namespace:v0.4"), None)
        .await
        .expect("resolves");
    assert_eq!(env.tokens.count(), 2, "token reused");
    assert_eq!(env.proxy.total(), 2);
    assert!(
        env.proxy.seen().iter().all(|s| s
            .authorization
            .as_deref()
            .is_some_and(|a| a.starts_with("Bearer "))),
        "the registry only ever sees the token, never the password"
    );
    let scopes = env.tokens.scopes.lock().expect("scopes").clone();
    assert_eq!(
        scopes,
        vec![
            "repository:fns/set-namespace:pull",
            "repository:fns/multi-arch:pull"
        ]
    );
}

#[tokio::test]
async fn identity_tokens_use_the_oauth2_refresh_flow() {
    let env = token_env().await;
    let host = env.proxy.host.clone();
    let (_d, cfg) = docker_config(
        &json!({"auths": {host.clone(): {"username": "<token>", "identitytoken": REFRESH}}}),
    );
    let got = resolver(&env.settings(&cfg))
        .resolve(&format!("{host}/fns/cmd-only:v1"), None)
        .await
        .expect("resolves with a refresh token");
    assert_eq!(got.digest, env.samples.cmd_only.digest);
    assert_eq!(got.entrypoint, vec!["/bin/fn", "--serve"]);
}

#[tokio::test]
async fn token_server_refusals_and_outages_are_typed_and_leak_nothing() {
    let env = token_env().await;
    let host = env.proxy.host.clone();
    let image = format!("{host}/fns/set-namespace:v0.4");

    let (_d, wrong) = docker_config(
        &json!({"auths": {host.clone(): {"auth": basic_auth("fn-user", "not-the-password")}}}),
    );
    let err = resolver(&env.settings(&wrong))
        .resolve(&image, None)
        .await
        .expect_err("wrong password");
    assert_eq!(err.kind(), ErrorKind::Unauthorized);
    assert!(err.to_string().contains("credentials rejected"), "{err}");

    let (_d, none) = docker_config(&json!({"auths": {}}));
    let err = resolver(&env.settings(&none))
        .resolve(&image, None)
        .await
        .expect_err("anonymous refused");
    assert_eq!(err.kind(), ErrorKind::Unauthorized);
    assert!(
        err.to_string().contains("no credentials configured"),
        "{err}"
    );

    let (_d, bad_refresh) = docker_config(
        &json!({"auths": {host.clone(): {"identitytoken": "expired-refresh-token"}}}),
    );
    let err = resolver(&env.settings(&bad_refresh))
        .resolve(&image, None)
        .await
        .expect_err("bad refresh token");
    assert_eq!(err.kind(), ErrorKind::Unauthorized);
    assert!(!err.to_string().contains("expired-refresh-token"), "{err}");

    // A token realm on plain HTTP that is not marked insecure gets no password.
    let (_d, good) =
        docker_config(&json!({"auths": {host.clone(): {"auth": basic_auth("fn-user", PASSWORD)}}}));
    let mut s = env.settings(&good);
    s.insecure_hosts = vec![host.clone()];
    let before = env.tokens.count();
    let err = resolver(&s)
        .resolve(&image, None)
        .await
        .expect_err("plain-HTTP realm");
    assert_eq!(err.kind(), ErrorKind::Unauthorized);
    assert!(
        err.to_string().contains("refusing to send credentials"),
        "{err}"
    );
    assert_eq!(
        env.tokens.count(),
        before,
        "the token server never saw the password"
    );

    assert!(!err.to_string().contains(PASSWORD));
    drop(env.registry);
}

#[tokio::test]
async fn a_token_server_that_is_down_is_unreachable_and_named() {
    crate::common::init_crypto();
    let tokens = TokenServer::start(&[("fn-user", PASSWORD)], &[], false).await;
    let dead_realm_port = crate::common::free_port();
    let registry = Registry::start(
        None,
        Auth::Token {
            realm: format!("http://127.0.0.1:{dead_realm_port}/token"),
            service: SERVICE.into(),
            issuer: ISSUER.into(),
            root_pem: tokens.root_pem.clone(),
        },
    );
    let (_d, cfg) = docker_config(
        &json!({"auths": {registry.host.clone(): {"auth": basic_auth("fn-user", PASSWORD)}}}),
    );
    let mut s = settings();
    s.private_registries = true;
    s.docker_config_path = cfg;
    s.insecure_hosts = vec![
        registry.host.clone(),
        format!("127.0.0.1:{dead_realm_port}"),
    ];
    let err = resolver(&s)
        .resolve(&format!("{}/fns/set-namespace:v0.4", registry.host), None)
        .await
        .expect_err("token server down");
    assert_eq!(err.kind(), ErrorKind::Unreachable, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("token server 127.0.0.1:{dead_realm_port}")),
        "{msg}"
    );
    assert!(!msg.contains(PASSWORD));
}

#[tokio::test]
async fn a_blob_redirect_to_another_host_carries_no_credentials() {
    let env = token_env().await;
    // The "storage" host: another registry with the same (deterministic)
    // images, reachable without credentials, as a pre-signed URL would be.
    let storage = Registry::start(None, Auth::None);
    samples()
        .push(&Pusher::new(storage.url(), reqwest::Client::new()))
        .await;
    let cdn = Proxy::start(&storage.url()).await;
    env.proxy.set_fault(
        crate::common::proxy::Fault::Redirect(format!("http://{}", cdn.host)),
        Some(Kind::Blob),
    );
    let host = env.proxy.host.clone();
    let (_d, cfg) =
        docker_config(&json!({"auths": {host.clone(): {"auth": basic_auth("fn-user", PASSWORD)}}}));
    // Plain HTTP to the storage host: it must be an --insecure-registry too.
    let mut settings = env.settings(&cfg);
    let refused = resolver(&settings)
        .resolve(&format!("{host}/fns/set-namespace:v0.4"), None)
        .await
        .expect_err("a redirect to an unlisted plain-HTTP host is not followed");
    assert!(
        refused.to_string().contains(&cdn.host)
            && refused.to_string().contains("insecure-registry"),
        "{refused}"
    );
    assert_eq!(cdn.total(), 0, "nothing reached the unlisted host");
    settings.insecure_hosts.push(cdn.host.clone());
    let got = resolver(&settings)
        .resolve(&format!("{host}/fns/set-namespace:v0.4"), None)
        .await
        .expect("resolves through the redirect");
    assert_eq!(got.digest, env.samples.entrypoint.digest);
    let at_cdn = cdn.seen();
    assert!(
        !at_cdn.is_empty() && at_cdn.iter().all(|s| s.kind == Kind::Blob),
        "{at_cdn:?}"
    );
    assert!(
        at_cdn.iter().all(|s| s.authorization.is_none()),
        "credentials followed the redirect: {at_cdn:?}"
    );
    assert!(
        env.proxy.seen().iter().any(|s| s
            .authorization
            .as_deref()
            .is_some_and(|a| a.starts_with("Bearer "))),
        "the registry itself was sent its token"
    );
}

#[tokio::test]
async fn a_redirect_from_https_to_plain_http_is_refused() {
    crate::common::init_crypto();
    // The plain-HTTP host, listed as insecure: a downgrade is refused anyway.
    let plain = crate::PlainEnv::start().await;
    // An HTTPS registry front that redirects every request there.
    let certs = crate::common::loopback_certs();
    let cert = fn_image_resolver::server::tls::ReloadingCert::load(
        certs.path().join("tls.crt"),
        certs.path().join("tls.key"),
    )
    .expect("cert");
    let target = format!("http://{}", plain.proxy.host);
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
        let location = format!("{target}{uri}");
        async move { axum::response::Redirect::temporary(&location) }
    });
    let listener = fn_image_resolver::server::Listener::bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let front = listener.local_addr();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(fn_image_resolver::server::serve_tls(
        listener,
        app,
        cert,
        fn_image_resolver::server::HttpLimits::default(),
        stop.clone(),
    ));
    let mut settings = plain.settings();
    settings.private_registries = true;
    settings.tls_ca_dir = Some(certs.path().to_path_buf());
    let front_host = format!("127.0.0.1:{}", front.port());
    let (_d, cfg) = docker_config(
        &json!({"auths": {front_host.clone(): {"auth": basic_auth("fn-user", PASSWORD)}}}),
    );
    settings.docker_config_path = cfg;
    let error = resolver(&settings)
        .resolve(&format!("{front_host}/fns/set-namespace:v0.4"), None)
        .await
        .expect_err("the downgrade is refused");
    assert!(error.to_string().contains("HTTPS to plain HTTP"), "{error}");
    assert_eq!(plain.proxy.total(), 0, "nothing was sent in the clear");
    stop.cancel();
}

#[tokio::test]
async fn a_token_request_follows_no_redirect() {
    crate::common::init_crypto();
    let tokens = TokenServer::start(&[("fn-user", PASSWORD)], &[(REFRESH, "fn-user")], false).await;
    // The realm the registry names answers with a redirect to the real one.
    let realm_front = Proxy::start(&format!("http://127.0.0.1:{}", tokens.port)).await;
    realm_front.set_fault(
        crate::common::proxy::Fault::Redirect(format!("http://127.0.0.1:{}", tokens.port)),
        None,
    );
    let registry = Registry::start(
        None,
        Auth::Token {
            realm: format!("http://{}/token", realm_front.host),
            service: SERVICE.into(),
            issuer: ISSUER.into(),
            root_pem: tokens.root_pem.clone(),
        },
    );
    let host = registry.host.clone();
    for credential in [
        json!({"auth": basic_auth("fn-user", PASSWORD)}),
        json!({"identitytoken": REFRESH}),
    ] {
        let (_d, cfg) = docker_config(&json!({"auths": {host.clone(): credential}}));
        let mut s = settings();
        s.private_registries = true;
        s.docker_config_path = cfg;
        s.insecure_hosts = vec![
            host.clone(),
            realm_front.host.clone(),
            format!("127.0.0.1:{}", tokens.port),
        ];
        let error = resolver(&s)
            .resolve(&format!("{host}/fns/set-namespace:v0.4"), None)
            .await
            .expect_err("no token through a redirect");
        assert!(!error.to_string().contains(PASSWORD), "{error}");
    }
    assert!(realm_front.total() >= 2, "the realm was asked");
    assert_eq!(
        tokens.count(),
        0,
        "no credential followed a redirect to the token server"
    );
}

#[tokio::test]
async fn two_config_keys_for_one_registry_pick_the_exact_one_in_either_order() {
    let env = basic_env().await;
    let host = env.registry.host.clone();
    let image = format!("{host}/fns/set-namespace:v0.4");
    let right = basic_auth("fn-user", PASSWORD);
    let wrong = basic_auth("fn-user", "wrong-pass");
    // Written as text: the order of the keys is the point.
    for text in [
        format!(
            r#"{{"auths":{{"{host}":{{"auth":"{right}"}},"https://{host}/v2/":{{"auth":"{wrong}"}}}}}}"#
        ),
        format!(
            r#"{{"auths":{{"https://{host}/v2/":{{"auth":"{wrong}"}},"{host}":{{"auth":"{right}"}}}}}}"#
        ),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(".dockerconfigjson");
        std::fs::write(&path, &text).expect("write");
        let got = resolver(&env.settings(&path))
            .resolve(&image, None)
            .await
            .unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(got.digest, env.samples.entrypoint.digest);
    }
}

/// `serve` starts without the Docker config and the registry CA that its
/// optional Secret volumes would hold (a Porch without private
/// registries): degraded, with the reason, until they appear; then it takes
/// both up without a restart.
#[tokio::test]
async fn a_docker_config_and_ca_that_appear_later_are_taken_up() {
    use fn_image_resolver::cache::{CacheSettings, CachedResolver};
    use fn_image_resolver::health::{Check, Readiness};
    use fn_image_resolver::registry::PRIVATE_REGISTRIES_CHECK;
    use std::sync::Arc;

    let env = basic_env().await;
    let host = env.registry.host.clone();
    let image = format!("{host}/fns/set-namespace:v0.4");
    // The mounts as the kubelet makes them for optional Secrets that do
    // not exist: empty directories.
    let auth_mount = tempfile::tempdir().expect("tempdir");
    let ca_mount = tempfile::tempdir().expect("tempdir");
    let mut settings = env.settings(&auth_mount.path().join(".dockerconfigjson"));
    settings.tls_ca_dir = Some(ca_mount.path().to_path_buf());
    settings.wait_for_files = true;
    let resolver = Resolver::new(&settings).expect("no files is no error here");
    let cache = CachedResolver::new(
        Arc::new(resolver),
        CacheSettings::default(),
        fn_image_resolver::metrics::Metrics::new(),
    );
    let readiness = Arc::new(Readiness::default());
    cache.resolver().report_readiness(&readiness);
    let Some(Check::Degraded(reason)) = readiness.get(PRIVATE_REGISTRIES_CHECK) else {
        panic!("{:?}", readiness.get(PRIVATE_REGISTRIES_CHECK));
    };
    assert!(
        reason.contains("private registries are off until the file appears")
            && reason.contains(&auth_mount.path().display().to_string())
            && reason.contains("verified with the system roots until it appears"),
        "{reason}"
    );
    assert!(readiness.snapshot().0, "degraded is ready");
    let err = cache
        .resolve(&image, None)
        .await
        .expect_err("no CA, no credentials");
    assert_eq!(err.kind(), ErrorKind::Tls, "{err}");

    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(
        cache
            .clone()
            .follow_credentials(readiness.clone(), shutdown.clone()),
    );
    tokio::spawn(
        cache
            .clone()
            .follow_registry_ca(readiness.clone(), shutdown.clone()),
    );
    let auth = json!({"auths": {host.clone(): {"auth": basic_auth("fn-user", PASSWORD)}}});
    crate::common::k8s::kubelet_swap(auth_mount.path(), auth.to_string().as_bytes(), 1);
    let ca_pem = std::fs::read(env.ca.path().join("ca.crt")).expect("ca");
    crate::common::k8s::kubelet_swap_files(ca_mount.path(), &[("ca.crt", &ca_pem)], 1);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while readiness.get(PRIVATE_REGISTRIES_CHECK) != Some(Check::Ready) {
        assert!(
            std::time::Instant::now() < deadline,
            "never took the files up: {:?}",
            readiness.get(PRIVATE_REGISTRIES_CHECK)
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (got, _) = cache.resolve(&image, None).await.expect("resolves now");
    assert_eq!(got.digest, env.samples.entrypoint.digest);
    assert_eq!(got.pull_secret.as_deref(), Some("auth-secret"));
    shutdown.cancel();
}

/// `resolve` is told a file: one that is not there is an error (exit 2)
/// naming it, its cause said once.
#[test]
fn resolve_with_a_docker_config_that_is_not_there_says_so_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("missing/.dockerconfigjson");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fn-image-resolver"))
        .args([
            "resolve",
            "--enable-private-registries=true",
            "r.io/fns/x:v1",
        ])
        .arg(format!("--registry-auth-secret-path={}", path.display()))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "{stderr}"
    );
}
