//! Image shapes read the way containerd will run them, against the real
//! registry with images built here: index entries without a platform,
//! nested indexes, arm64 and arm64/v8, BuildKit attestations, Docker
//! manifest lists, config keys in any case, arguments that cannot be run,
//! upper-case digests, and Docker config keys that name one registry.

use serde_json::{Value, json};

use fn_image_resolver::cache::CacheSettings;
use fn_image_resolver::registry::{ErrorKind, Platform};

use crate::common::oci::{
    Child, Index, Pusher, image, image_with_config, image_with_config_text, index_of,
};
use crate::common::proxy::Kind;
use crate::{PlainEnv, cached, resolver};

/// A config for `os/arch` with `entrypoint`.
fn config(os: &str, arch: &str, entrypoint: &str) -> Value {
    json!({"os": os, "architecture": arch, "config": {"Entrypoint": [entrypoint]},
           "rootfs": {"type": "layers", "diff_ids": []}})
}

fn platform(s: &str) -> Platform {
    s.parse().expect("platform")
}

async fn push_index(env: &PlainEnv, repo: &str, index: &Index) -> String {
    Pusher::new(env.registry.url(), reqwest::Client::new())
        .index(repo, "v1", index)
        .await;
    env.image(&format!("{repo}:v1"))
}

#[tokio::test]
async fn an_entry_without_a_platform_is_a_candidate_checked_against_its_config() {
    let env = PlainEnv::start().await;
    let arm = image_with_config(
        "platformless-arm",
        config("linux", "arm64", "/fn-arm"),
        false,
    );
    let amd = image_with_config(
        "platformless-amd",
        config("linux", "amd64", "/fn-amd"),
        false,
    );
    // First candidate for any platform: the platformless arm64 image.
    let only_platformless = index_of(
        vec![
            Child::image_as(arm.clone(), None),
            Child::image_as(amd.clone(), None),
        ],
        false,
    );
    let tag = push_index(&env, "fns/platformless", &only_platformless).await;
    let r = resolver(&env.settings());
    env.proxy.reset();
    let got = r
        .resolve(&tag, Some(&platform("linux/arm64")))
        .await
        .expect("arm64");
    assert_eq!(got.digest, only_platformless.digest, "the index is pinned");
    assert_eq!(got.entrypoint, ["/fn-arm"]);
    assert_eq!(
        (
            env.proxy.count("GET", Kind::Manifest),
            env.proxy.count("GET", Kind::Blob)
        ),
        (2, 1),
        "index, image, config: the config read serves the check too"
    );
    // For amd64 containerd takes the same first candidate and finds its
    // config says arm64: no image (go-containerregistry would hand out arm64).
    let err = r
        .resolve(&tag, Some(&platform("linux/amd64")))
        .await
        .expect_err("not for amd64");
    assert_eq!(err.kind(), ErrorKind::PlatformNotFound);
    assert!(err.to_string().contains("linux/arm64"), "{err}");

    // A matching entry comes before any platformless one.
    let mixed = index_of(
        vec![
            Child::image_as(arm, None),
            Child::image_as(
                amd.clone(),
                Some(json!({"os": "linux", "architecture": "amd64"})),
            ),
        ],
        false,
    );
    let tag = push_index(&env, "fns/mixed", &mixed).await;
    let got = r
        .resolve(&tag, Some(&platform("linux/amd64")))
        .await
        .expect("amd64");
    assert_eq!(got.entrypoint, ["/fn-amd"]);
    let got = r
        .resolve(&tag, Some(&platform("linux/arm64")))
        .await
        .expect("arm64");
    assert_eq!(got.entrypoint, ["/fn-arm"], "then the platformless one");
}

#[tokio::test]
async fn nested_indexes_are_descended_and_the_top_digest_is_pinned() {
    let env = PlainEnv::start().await;
    let amd = image("nested", Some(&["/fn-nested"]), None, "linux/amd64", false);
    let arm = image(
        "nested",
        Some(&["/fn-nested-arm"]),
        None,
        "linux/arm64",
        false,
    );
    let inner = crate::common::oci::index(vec![amd, arm], false);
    // The inner index listed without a platform, as containerd allows.
    let outer = index_of(vec![Child::index(inner.clone(), None)], false);
    let tag = push_index(&env, "fns/nested", &outer).await;
    let r = resolver(&env.settings());
    let got = r
        .resolve(&tag, None)
        .await
        .expect("resolves through two indexes");
    assert_eq!(got.digest, outer.digest);
    assert_eq!(got.entrypoint, ["/fn-nested"]);
    let got = r
        .resolve(&tag, Some(&platform("linux/arm64/v8")))
        .await
        .expect("arm64");
    assert_eq!(got.entrypoint, ["/fn-nested-arm"]);

    // Four levels are followed, five are not.
    let mut deep = inner;
    for _ in 0..3 {
        deep = index_of(vec![Child::index(deep, None)], false);
    }
    let tag = push_index(&env, "fns/deep4", &deep).await;
    assert_eq!(
        r.resolve(&tag, None).await.expect("depth 4").entrypoint,
        ["/fn-nested"]
    );
    let deeper = index_of(vec![Child::index(deep, None)], false);
    let tag = push_index(&env, "fns/deep5", &deeper).await;
    let err = r.resolve(&tag, None).await.expect_err("depth 5");
    assert_eq!(err.kind(), ErrorKind::UnsupportedImage);
    assert!(ErrorKind::UnsupportedImage.is_definitive());
}

#[tokio::test]
async fn arm64_and_arm64_v8_are_one_platform_both_ways() {
    let env = PlainEnv::start().await;
    let plain = image_with_config("arm-plain", config("linux", "arm64", "/plain"), false);
    let v8 = image_with_config("arm-v8", config("linux", "arm64", "/v8"), false);
    let says_plain = index_of(
        vec![Child::image_as(
            plain,
            Some(json!({"os": "linux", "architecture": "arm64"})),
        )],
        false,
    );
    let says_v8 = index_of(
        vec![Child::image_as(
            v8,
            Some(json!({"os": "linux", "architecture": "arm64", "variant": "v8"})),
        )],
        false,
    );
    let plain_tag = push_index(&env, "fns/arm-plain", &says_plain).await;
    let v8_tag = push_index(&env, "fns/arm-v8", &says_v8).await;
    let r = resolver(&env.settings());
    for asked in ["linux/arm64", "linux/arm64/v8"] {
        assert_eq!(
            r.resolve(&plain_tag, Some(&platform(asked)))
                .await
                .expect(asked)
                .entrypoint,
            ["/plain"]
        );
        assert_eq!(
            r.resolve(&v8_tag, Some(&platform(asked)))
                .await
                .expect(asked)
                .entrypoint,
            ["/v8"]
        );
    }
}

#[tokio::test]
async fn buildkit_attestations_and_docker_manifest_lists_resolve_to_the_image() {
    let env = PlainEnv::start().await;
    let amd = image("buildkit", Some(&["/fn-bk"]), None, "linux/amd64", false);
    let attestation = image_with_config(
        "buildkit-attestation",
        json!({"architecture": "unknown", "os": "unknown", "rootfs": {"type": "layers", "diff_ids": []}}),
        false,
    );
    let mut attest = Child::image_as(
        attestation,
        Some(json!({"os": "unknown", "architecture": "unknown"})),
    );
    attest.annotations = Some(json!({
        "vnd.docker.reference.digest": amd.digest,
        "vnd.docker.reference.type": "attestation-manifest"
    }));
    let buildkit = index_of(vec![Child::image(amd), attest], false);
    let tag = push_index(&env, "fns/buildkit", &buildkit).await;
    let r = resolver(&env.settings());
    let got = r.resolve(&tag, None).await.expect("buildkit index");
    assert_eq!(
        (got.digest, got.entrypoint),
        (buildkit.digest.clone(), vec!["/fn-bk".to_string()])
    );
    let err = r
        .resolve(&tag, Some(&platform("linux/arm64")))
        .await
        .expect_err("no arm64");
    assert!(
        !err.to_string().contains("unknown"),
        "attestations are not offered: {err}"
    );

    let list = crate::common::oci::index(
        vec![
            image(
                "docker-list",
                Some(&["/fn-list"]),
                None,
                "linux/amd64",
                true,
            ),
            image(
                "docker-list",
                Some(&["/fn-list-arm"]),
                None,
                "linux/arm64",
                true,
            ),
        ],
        true,
    );
    let tag = push_index(&env, "fns/docker-list", &list).await;
    let got = r.resolve(&tag, None).await.expect("manifest list");
    assert_eq!(
        (got.digest, got.entrypoint),
        (list.digest, vec!["/fn-list".to_string()])
    );
}

#[tokio::test]
async fn config_keys_in_any_case_are_read_and_the_last_one_wins() {
    let env = PlainEnv::start().await;
    let pusher = Pusher::new(env.registry.url(), reqwest::Client::new());
    let lower = image_with_config(
        "lower-keys",
        json!({"os": "linux", "architecture": "amd64",
               "config": {"entrypoint": ["/from-lower"], "cmd": ["--lower"]},
               "rootfs": {"type": "layers", "diff_ids": []}}),
        false,
    );
    pusher.image("fns/lower-keys", "v1", &lower).await;
    // Both spellings, in this order, in the blob as written.
    let both = image_with_config_text(
        "both-keys",
        r#"{"os":"linux","architecture":"amd64","config":{"Entrypoint":["/first"],"ENTRYPOINT":["/last"]},"rootfs":{"type":"layers","diff_ids":[]}}"#,
        false,
    );
    pusher.image("fns/both-keys", "v1", &both).await;
    let r = resolver(&env.settings());
    let got = r
        .resolve(&env.image("fns/lower-keys:v1"), None)
        .await
        .expect("lower");
    assert_eq!(
        (got.entrypoint, got.cmd),
        (vec!["/from-lower".to_string()], vec!["--lower".to_string()])
    );
    let got = r
        .resolve(&env.image("fns/both-keys:v1"), None)
        .await
        .expect("both");
    assert_eq!(got.entrypoint, ["/last"]);
}

#[tokio::test]
async fn an_argument_with_a_nul_is_definitive_and_cached_negatively() {
    let env = PlainEnv::start().await;
    let nul = image_with_config("nul-arg", config("linux", "amd64", "/fn\u{0}evil"), false);
    Pusher::new(env.registry.url(), reqwest::Client::new())
        .image("fns/nul", "v1", &nul)
        .await;
    let (cache, _) = cached(&env.settings(), CacheSettings::default());
    let tag = env.image("fns/nul:v1");
    let err = cache.resolve(&tag, None).await.expect_err("refused");
    assert_eq!(err.kind(), ErrorKind::UnsupportedImage);
    assert!(err.to_string().contains("NUL"), "{err}");
    let requests = env.proxy.total();
    let again = cache.resolve(&tag, None).await.expect_err("still refused");
    assert_eq!(again.kind(), ErrorKind::UnsupportedImage);
    assert_eq!(env.proxy.total(), requests, "remembered, not fetched again");
}

#[tokio::test]
async fn an_upper_case_digest_is_an_invalid_reference_before_any_registry_is_asked() {
    let env = PlainEnv::start().await;
    let upper = format!(
        "{}/fns/set-namespace@{}",
        env.proxy.host,
        env.samples
            .entrypoint
            .digest
            .to_uppercase()
            .replace("SHA256:", "sha256:")
    );
    let err = resolver(&env.settings())
        .resolve(&upper, None)
        .await
        .expect_err("refused");
    assert_eq!(err.kind(), ErrorKind::InvalidReference);
    assert!(err.to_string().contains("lower case"), "{err}");
    assert_eq!(env.proxy.total(), 0);
}
