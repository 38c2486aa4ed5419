//! Resolution against a plain-HTTP registry through a counting proxy.

use fn_image_resolver::registry::ErrorKind;

use crate::common::proxy::{Fault, Kind};
use crate::{PlainEnv, resolver};

#[tokio::test]
async fn single_platform_image_costs_one_manifest_and_one_config_request() {
    let env = PlainEnv::start().await;
    let r = resolver(&env.settings());
    let image = env.image("fns/set-namespace:v0.4");

    let got = r.resolve(&image, None).await.expect("resolves");
    let want = &env.samples.entrypoint;
    assert_eq!(got.image, image);
    assert_eq!(got.reference, image);
    assert_eq!(got.digest, want.digest);
    assert_eq!(got.pinned, format!("{image}@{}", want.digest));
    assert_eq!(got.entrypoint, vec!["/usr/local/bin/function"]);
    assert_eq!(got.config_entrypoint, vec!["/usr/local/bin/function"]);
    assert!(got.cmd.is_empty());
    assert_eq!(got.platform, "linux/amd64");
    assert_eq!(got.registry, env.proxy.host);
    assert_eq!(got.pull_secret, None);

    // Cold: one manifest GET, one config GET; no /v2/ ping, no HEAD.
    assert_eq!(env.proxy.count("GET", Kind::Manifest), 1);
    assert_eq!(env.proxy.count("GET", Kind::Blob), 1);
    assert_eq!(env.proxy.total(), 2, "{:?}", env.proxy.seen());

    // The ladder is not climbed again: the next resolve is two requests too.
    env.proxy.reset();
    r.resolve(&image, None).await.expect("resolves again");
    assert_eq!(env.proxy.total(), 2, "{:?}", env.proxy.seen());
}

#[tokio::test]
async fn cmd_only_image_uses_cmd_as_entrypoint_docker_schema2() {
    let env = PlainEnv::start().await;
    let r = resolver(&env.settings());
    let got = r
        .resolve(&env.image("fns/cmd-only:v1"), None)
        .await
        .expect("resolves");
    assert_eq!(got.digest, env.samples.cmd_only.digest);
    assert_eq!(got.entrypoint, vec!["/bin/fn", "--serve"]);
    assert_eq!(got.cmd, vec!["/bin/fn", "--serve"]);
    assert!(got.config_entrypoint.is_empty());
}

#[tokio::test]
async fn image_without_entrypoint_or_cmd_resolves_empty() {
    let env = PlainEnv::start().await;
    let r = resolver(&env.settings());
    let got = r
        .resolve(&env.image("fns/no-entrypoint:v1"), None)
        .await
        .expect("resolves");
    assert_eq!(got.digest, env.samples.neither.digest);
    assert!(got.entrypoint.is_empty() && got.cmd.is_empty());
}

#[tokio::test]
async fn index_pins_the_index_digest_and_reads_the_platform_child() {
    let env = PlainEnv::start().await;
    let image = env.image("fns/multi-arch:v1");
    let r = resolver(&env.settings());
    let amd = r.resolve(&image, None).await.expect("amd64");
    assert_eq!(amd.digest, env.samples.multi.digest);
    assert_eq!(amd.pinned, format!("{image}@{}", env.samples.multi.digest));
    assert_eq!(amd.entrypoint, vec!["/fn-amd64"]);
    assert_eq!(amd.platform, "linux/amd64");
    // Index, platform manifest, config.
    assert_eq!(env.proxy.count("GET", Kind::Manifest), 2);
    assert_eq!(env.proxy.count("GET", Kind::Blob), 1);

    let arm = r
        .resolve(&image, Some(&"linux/arm64".parse().expect("platform")))
        .await
        .expect("arm64");
    assert_eq!(
        arm.digest, env.samples.multi.digest,
        "the index digest, whatever the platform"
    );
    assert_eq!(arm.entrypoint, vec!["/fn-arm64"]);
    assert_eq!(arm.cmd, vec!["--arm"]);
    assert_eq!(arm.platform, "linux/arm64");

    let err = r
        .resolve(&image, Some(&"linux/s390x".parse().expect("platform")))
        .await
        .expect_err("no s390x");
    assert_eq!(err.kind(), ErrorKind::PlatformNotFound);
    let msg = err.to_string();
    assert!(
        msg.contains("linux/s390x") && msg.contains("linux/amd64, linux/arm64"),
        "{msg}"
    );
    assert!(msg.contains(&image), "{msg}");
}

#[tokio::test]
async fn digest_pinned_references_keep_their_digest_and_still_read_the_config() {
    let env = PlainEnv::start().await;
    let r = resolver(&env.settings());
    let digest = &env.samples.entrypoint.digest;
    for image in [
        env.image(&format!("fns/set-namespace@{digest}")),
        env.image(&format!("fns/set-namespace:v0.4@{digest}")),
    ] {
        env.proxy.reset();
        let got = r.resolve(&image, None).await.expect("resolves");
        assert_eq!(&got.digest, digest);
        assert_eq!(got.pinned, image);
        assert_eq!(got.entrypoint, vec!["/usr/local/bin/function"]);
        let manifest_paths: Vec<String> = env
            .proxy
            .seen()
            .into_iter()
            .filter(|s| s.kind == Kind::Manifest)
            .map(|s| s.path)
            .collect();
        assert_eq!(
            manifest_paths,
            vec![format!("/v2/fns/set-namespace/manifests/{digest}")]
        );
    }
}

#[tokio::test]
async fn unknown_tags_and_repositories_are_not_found() {
    let env = PlainEnv::start().await;
    let r = resolver(&env.settings());
    for image in [
        env.image("fns/set-namespace:nope"),
        env.image("fns/missing:v1"),
    ] {
        let err = r.resolve(&image, None).await.expect_err("missing");
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
        let msg = err.to_string();
        assert!(msg.contains(&image) && msg.contains("not found"), "{msg}");
    }
    // Not found ends the ladder at once: one request each, no retries.
    assert_eq!(env.proxy.total(), 2, "{:?}", env.proxy.seen());
}

#[tokio::test]
async fn invalid_references_fail_before_any_request() {
    let env = PlainEnv::start().await;
    let r = resolver(&env.settings());
    for image in [
        "",
        "UPPER/case:v1",
        "a b",
        &env.image("fns/x@sha256:123"),
        &env.image("fns/x:"),
    ] {
        let err = r.resolve(image, None).await.expect_err(image);
        assert_eq!(err.kind(), ErrorKind::InvalidReference, "{image}: {err}");
        assert!(err.to_string().contains(&format!("{image:?}")), "{err}");
    }
    assert_eq!(env.proxy.total(), 0);
}

#[tokio::test]
async fn a_registry_that_lies_about_content_is_rejected() {
    let env = PlainEnv::start().await;
    let r = resolver(&env.settings());
    let forged = crate::common::oci::image("forged", Some(&["/evil"]), None, "linux/amd64", false);
    env.proxy.set_fault(
        Fault::ReplaceBody(forged.manifest.clone()),
        Some(Kind::Manifest),
    );

    // By tag: the Docker-Content-Digest header no longer matches the body.
    let err = r
        .resolve(&env.image("fns/set-namespace:v0.4"), None)
        .await
        .expect_err("lie");
    assert_eq!(err.kind(), ErrorKind::InvalidResponse, "{err}");
    assert!(err.to_string().contains("does not match"), "{err}");

    // By digest: the body does not hash to the digest asked for.
    let pinned = env.image(&format!(
        "fns/set-namespace@{}",
        env.samples.entrypoint.digest
    ));
    let err = r.resolve(&pinned, None).await.expect_err("lie");
    assert_eq!(err.kind(), ErrorKind::InvalidResponse, "{err}");

    // A config blob that does not match its digest.
    env.proxy.set_fault(
        Fault::ReplaceBody(b"{\"config\":{}}".to_vec()),
        Some(Kind::Blob),
    );
    let err = r
        .resolve(&env.image("fns/cmd-only:v1"), None)
        .await
        .expect_err("lie");
    assert_eq!(err.kind(), ErrorKind::InvalidResponse, "{err}");
    assert!(err.to_string().contains("config blob"), "{err}");
}

#[tokio::test]
async fn rate_limits_and_server_errors_are_typed() {
    let env = PlainEnv::start().await;
    let r = resolver(&env.settings());
    let image = env.image("fns/set-namespace:v0.4");
    env.proxy.set_fault(
        Fault::Status {
            code: 429,
            retry_after: Some(7),
        },
        None,
    );
    let err = r.resolve(&image, None).await.expect_err("429");
    assert_eq!(err.kind(), ErrorKind::RateLimited);
    assert_eq!(err.retry_after(), Some(std::time::Duration::from_secs(7)));
    assert!(err.to_string().contains("retry after 7s"), "{err}");

    env.proxy.set_fault(
        Fault::Status {
            code: 500,
            retry_after: None,
        },
        None,
    );
    let err = r.resolve(&image, None).await.expect_err("500");
    assert_eq!(err.kind(), ErrorKind::RegistryError);
    assert!(!err.kind().is_definitive());
    assert!(err.to_string().contains("HTTP 500"), "{err}");

    env.proxy.set_fault(Fault::None, None);
    r.resolve(&image, None).await.expect("recovers");
}

#[tokio::test]
async fn a_slow_registry_times_out_and_a_closed_port_is_unreachable() {
    let env = PlainEnv::start().await;
    let mut s = env.settings();
    s.resolve_timeout = std::time::Duration::from_millis(300);
    let r = resolver(&s);
    env.proxy
        .set_fault(Fault::Delay(std::time::Duration::from_secs(3)), None);
    let err = r
        .resolve(&env.image("fns/set-namespace:v0.4"), None)
        .await
        .expect_err("slow");
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");

    let closed = crate::common::free_port();
    let mut s = crate::settings();
    s.insecure_hosts = vec![format!("127.0.0.1:{closed}")];
    let r = resolver(&s);
    let err = r
        .resolve(&format!("127.0.0.1:{closed}/fns/x:v1"), None)
        .await
        .expect_err("closed");
    assert_eq!(err.kind(), ErrorKind::Unreachable, "{err}");
}

#[tokio::test]
async fn plain_http_is_only_used_for_insecure_hosts() {
    let env = PlainEnv::start().await;
    let r = resolver(&crate::settings());
    let err = r
        .resolve(&env.image("fns/set-namespace:v0.4"), None)
        .await
        .expect_err("plain HTTP host not marked insecure");
    assert_eq!(err.kind(), ErrorKind::Tls, "{err}");
    assert_eq!(env.proxy.total(), 0, "nothing was sent in the clear");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_new_images_keeps_registry_requests_within_the_fetch_limit() {
    let env = PlainEnv::start().await;
    let pusher = crate::common::oci::Pusher::new(env.registry.url(), reqwest::Client::new());
    pusher
        .tags("fns/burst", "burst-", &env.samples.entrypoint, 12)
        .await;
    let tags: Vec<String> = (0..12).map(|i| format!("burst-{i}")).collect();
    let mut settings = env.settings();
    settings.max_concurrent_fetches = 3;
    let r = std::sync::Arc::new(resolver(&settings));
    env.proxy.reset();
    env.proxy.set_delay(std::time::Duration::from_millis(200));
    let all = tags.iter().map(|tag| {
        let r = r.clone();
        let image = env.image(&format!("fns/burst:{tag}"));
        async move { r.resolve(&image, None).await }
    });
    let results = futures_util::future::join_all(all).await;
    for result in &results {
        assert_eq!(
            result.as_ref().expect("every image resolves").digest,
            env.samples.entrypoint.digest
        );
    }
    assert_eq!(env.proxy.total(), 24, "a manifest and a config per image");
    let peak = env.proxy.peak_in_flight();
    assert!(
        (1..=3).contains(&peak),
        "{peak} registry requests were in flight at once, over the limit of 3"
    );
}

#[tokio::test]
async fn a_registry_s_rate_limit_headers_become_metrics() {
    let env = PlainEnv::start().await;
    env.proxy
        .add_response_header("RateLimit-Limit", "100;w=21600");
    env.proxy
        .add_response_header("RateLimit-Remaining", "76;w=21600");
    let metrics = fn_image_resolver::metrics::Metrics::new();
    let r = fn_image_resolver::registry::Resolver::with_observer(
        &env.settings(),
        Some(metrics.clone()),
    )
    .expect("resolver");
    r.resolve(&env.image("fns/set-namespace:v0.4"), None)
        .await
        .expect("resolves");
    let text = metrics.encode();
    let host = &env.proxy.host;
    assert!(
        text.contains(&format!(
            "fn_image_resolver_registry_ratelimit_limit{{registry=\"{host}\"}} 100"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "fn_image_resolver_registry_ratelimit_remaining{{registry=\"{host}\"}} 76"
        )),
        "{text}"
    );
}
