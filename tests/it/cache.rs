//! The shared cache against a real registry: coalescing, tag revalidation,
//! stale answers, negative caching, capacity, credential changes.

use std::sync::Arc;
use std::time::Duration;

use fn_image_resolver::cache::{CacheSettings, CacheStatus, Cached};
use fn_image_resolver::registry::ErrorKind;
use serde_json::json;

use crate::common::oci::{Image, Pusher, image};
use crate::common::proxy::{Fault, Kind};
use crate::{Endpoint, PlainEnv, cached, docker_config};

/// Pushes a new image (`label`, Entrypoint `[entrypoint]`) under
/// `fns/set-namespace:v0.4`: the tag moves in the registry. Returns it.
async fn move_set_namespace(env: &PlainEnv, label: &str, entrypoint: &str) -> Image {
    let moved = image(label, Some(&[entrypoint]), None, "linux/amd64", false);
    Pusher::new(env.registry.url(), reqwest::Client::new())
        .image("fns/set-namespace", "v0.4", &moved)
        .await;
    moved
}

fn short_ttl() -> CacheSettings {
    CacheSettings {
        capacity: 1000,
        max_bytes: fn_image_resolver::cache::DEFAULT_MAX_BYTES,
        tag_ttl: Duration::from_millis(800),
        max_stale: Duration::from_secs(60),
        negative_ttl: Duration::from_millis(800),
    }
}

/// Sends `n` concurrent GET /v1/resolve requests; returns their statuses.
async fn herd(endpoint: &Endpoint, image: &str, n: usize) -> Vec<u16> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(n)
        .build()
        .expect("client");
    let url = endpoint.url(image);
    let requests = (0..n).map(|_| {
        let client = client.clone();
        let url = url.clone();
        async move {
            client
                .get(&url)
                .send()
                .await
                .expect("request")
                .status()
                .as_u16()
        }
    });
    futures_util::future::join_all(requests).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_misses_make_one_registry_fetch() {
    let env = PlainEnv::start().await;
    let endpoint = Endpoint::start(&env.settings(), CacheSettings::default()).await;
    // A registry slower than the herd's arrival, so every request overlaps
    // the first fetch.
    env.proxy.set_delay(Duration::from_millis(1000));
    let statuses = herd(&endpoint, &env.image("fns/set-namespace:v0.4"), 200).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(
        env.proxy.count("GET", Kind::Manifest),
        1,
        "{:?}",
        env.proxy.seen()
    );
    assert_eq!(env.proxy.count("GET", Kind::Blob), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_misses_on_a_failing_registry_share_one_failure() {
    let env = PlainEnv::start().await;
    let endpoint = Endpoint::start(&env.settings(), CacheSettings::default()).await;
    env.proxy.set_delay(Duration::from_millis(1000));
    env.proxy.set_fault(
        Fault::Status {
            code: 500,
            retry_after: None,
        },
        None,
    );
    let statuses = herd(&endpoint, &env.image("fns/set-namespace:v0.4"), 200).await;
    assert!(statuses.iter().all(|s| *s == 502), "{statuses:?}");
    assert_eq!(
        env.proxy.count("GET", Kind::Manifest),
        1,
        "one fetch, no retry per waiter"
    );

    // Transient failures are not cached: the next request tries again.
    env.proxy.set_delay(Duration::ZERO);
    env.proxy.set_fault(Fault::None, None);
    let statuses = herd(&endpoint, &env.image("fns/set-namespace:v0.4"), 1).await;
    assert_eq!(statuses, vec![200]);
}

#[tokio::test]
async fn a_moved_tag_is_seen_after_the_ttl_and_not_before() {
    let env = PlainEnv::start().await;
    // Long enough for the push below on a busy machine.
    let ttl = Duration::from_secs(3);
    let (cache, metrics) = cached(
        &env.settings(),
        CacheSettings {
            tag_ttl: ttl,
            ..short_ttl()
        },
    );
    let tag = env.image("fns/set-namespace:v0.4");
    let (first, status) = cache.resolve(&tag, None).await.expect("miss");
    // The entry was made before this instant.
    let fetched = std::time::Instant::now();
    assert_eq!(status, CacheStatus::Miss);
    assert_eq!(first.digest, env.samples.entrypoint.digest);

    // Move the tag in the registry.
    let moved = move_set_namespace(&env, "set-namespace v2", "/new-function").await;

    env.proxy.reset();
    let (before, status) = cache.resolve(&tag, None).await.expect("hit");
    assert_eq!(status, CacheStatus::Hit);
    assert_eq!(
        before.digest, first.digest,
        "within the TTL the cached answer stands"
    );
    assert_eq!(env.proxy.total(), 0);

    tokio::time::sleep((ttl + Duration::from_millis(100)).saturating_sub(fetched.elapsed())).await;
    let (stale, status) = cache.resolve(&tag, None).await.expect("stale");
    assert_eq!(
        status,
        CacheStatus::Stale,
        "the old answer is served while revalidating"
    );
    assert_eq!(stale.digest, first.digest);

    let mut after = stale;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        after = cache.resolve(&tag, None).await.expect("resolves").0;
        if after.digest != first.digest {
            break;
        }
    }
    assert_eq!(after.digest, moved.digest);
    assert_eq!(after.entrypoint, vec!["/new-function"]);
    // Revalidation: a HEAD saw the new digest, then the new manifest and config.
    assert_eq!(
        env.proxy.count("HEAD", Kind::Manifest),
        1,
        "{:?}",
        env.proxy.seen()
    );
    assert_eq!(env.proxy.count("GET", Kind::Manifest), 1);
    assert_eq!(env.proxy.count("GET", Kind::Blob), 1);
    assert!(
        metrics
            .encode()
            .contains("fn_image_resolver_cache_revalidations_total{result=\"refreshed\"} 1")
    );
}

#[tokio::test]
async fn an_unchanged_tag_is_revalidated_with_one_head_and_digests_never_expire() {
    let env = PlainEnv::start().await;
    let (cache, _) = cached(&env.settings(), short_ttl());
    let tag = env.image("fns/cmd-only:v1");
    let pinned = env.image(&format!("fns/cmd-only@{}", env.samples.cmd_only.digest));
    cache.resolve(&tag, None).await.expect("miss");
    cache.resolve(&pinned, None).await.expect("miss");
    env.proxy.reset();
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(
        cache.resolve(&pinned, None).await.expect("hit").1,
        CacheStatus::Hit
    );
    assert_eq!(
        cache.resolve(&tag, None).await.expect("stale").1,
        CacheStatus::Stale
    );
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if cache.resolve(&tag, None).await.expect("resolves").1 == CacheStatus::Hit {
            break;
        }
    }
    assert_eq!(
        cache.resolve(&tag, None).await.expect("fresh again").1,
        CacheStatus::Hit
    );
    let seen: Vec<(String, Kind)> = env
        .proxy
        .seen()
        .into_iter()
        .map(|s| (s.method, s.kind))
        .collect();
    assert_eq!(
        seen,
        vec![("HEAD".to_string(), Kind::Manifest)],
        "no config fetch for an unchanged tag"
    );
}

#[tokio::test]
async fn a_stopped_registry_still_answers_cached_tags_and_fails_fast_for_new_ones() {
    let mut env = PlainEnv::start().await;
    // Talk to the registry directly so that stopping it refuses connections.
    let mut settings = crate::settings();
    settings.insecure_hosts = vec![env.registry.host.clone()];
    let (cache, metrics) = cached(&settings, short_ttl());
    let tag = format!("{}/fns/set-namespace:v0.4", env.registry.host);
    cache.resolve(&tag, None).await.expect("miss");
    env.registry.stop();

    tokio::time::sleep(Duration::from_millis(900)).await;
    for _ in 0..3 {
        let (answer, status) = cache.resolve(&tag, None).await.expect("served stale");
        assert_eq!(status, CacheStatus::Stale);
        assert_eq!(answer.digest, env.samples.entrypoint.digest);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        metrics
            .encode()
            .contains("fn_image_resolver_cache_revalidations_total{result=\"failed\"}")
    );

    let started = std::time::Instant::now();
    let err = cache
        .resolve(&format!("{}/fns/never-seen:v1", env.registry.host), None)
        .await
        .expect_err("registry down");
    assert_eq!(err.kind(), ErrorKind::Unreachable, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "fails fast, not after a timeout"
    );
}

#[tokio::test]
async fn definitive_failures_are_cached_briefly_transient_ones_not_at_all() {
    let env = PlainEnv::start().await;
    let (cache, _) = cached(&env.settings(), short_ttl());
    let missing = env.image("fns/set-namespace:missing");
    for _ in 0..3 {
        let err = cache.resolve(&missing, None).await.expect_err("not found");
        assert_eq!(err.kind(), ErrorKind::NotFound);
    }
    assert_eq!(env.proxy.total(), 1, "not-found remembered");
    tokio::time::sleep(Duration::from_millis(900)).await;
    cache.resolve(&missing, None).await.expect_err("not found");
    assert_eq!(env.proxy.total(), 2, "and forgotten after the negative TTL");

    env.proxy.reset();
    env.proxy.set_fault(
        Fault::Status {
            code: 503,
            retry_after: None,
        },
        None,
    );
    let image = env.image("fns/cmd-only:v1");
    for _ in 0..3 {
        cache.resolve(&image, None).await.expect_err("503");
    }
    assert_eq!(env.proxy.total(), 3, "5xx is retried on the next request");
}

/// Resolves `repo:t0` .. `repo:t{n-1}` once each, through a cache of 8.
async fn resolve_tags(
    cache: &fn_image_resolver::cache::CachedResolver,
    env: &PlainEnv,
    repo: &str,
    n: usize,
) {
    for i in 0..n {
        cache
            .resolve(&env.image(&format!("{repo}:t{i}")), None)
            .await
            .expect("resolves");
    }
    assert!(cache.entry_count() <= 8, "{} entries", cache.entry_count());
}

#[tokio::test]
async fn capacity_is_respected_under_a_stream_of_distinct_images() {
    let env = PlainEnv::start().await;
    let pusher = Pusher::new(env.registry.url(), reqwest::Client::new());
    for i in 0..40 {
        pusher
            .manifest(
                "fns/set-namespace",
                &format!("t{i}"),
                &env.samples.entrypoint.manifest,
                env.samples.entrypoint.media_type,
            )
            .await;
    }
    let mut settings = short_ttl();
    settings.capacity = 8;
    let (cache, metrics) = cached(&env.settings(), settings);
    resolve_tags(&cache, &env, "fns/set-namespace", 40).await;
    let text = metrics.encode();
    let evicted: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("fn_image_resolver_cache_evictions_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("evictions metric");
    assert!(evicted >= 32, "{evicted} evictions");
}

#[tokio::test]
async fn a_scan_of_one_off_images_does_not_flush_a_hot_one() {
    let env = PlainEnv::start().await;
    let pusher = Pusher::new(env.registry.url(), reqwest::Client::new());
    pusher
        .tags(
            "fns/one-off",
            "t",
            &image("one-off", Some(&["/fn"]), None, "linux/amd64", false),
            40,
        )
        .await;
    let settings = CacheSettings {
        capacity: 8,
        ..CacheSettings::default()
    };
    let (cache, _) = cached(&env.settings(), settings);
    let hot = env.image("fns/set-namespace:v0.4");
    for _ in 0..3 {
        cache.resolve(&hot, None).await.expect("hot image");
    }
    let fetched = env.proxy.total();
    resolve_tags(&cache, &env, "fns/one-off", 40).await;
    let before = env.proxy.total();
    assert!(before > fetched, "the scan went to the registry");
    let (_, status) = cache.resolve(&hot, None).await.expect("hot image");
    assert_eq!(status, CacheStatus::Hit, "the hot image survived the scan");
    assert_eq!(env.proxy.total(), before, "and was not fetched again");
}

#[tokio::test]
async fn an_answer_is_served_only_with_the_credential_it_was_fetched_with() {
    let env = PlainEnv::start().await;
    let host = env.proxy.host.clone();
    let login =
        |password: &str| json!({"auths": {host.clone(): {"username": "u", "password": password}}});
    let (_dir, path) = docker_config(&login("old"));
    let mut settings = env.settings();
    settings.private_registries = true;
    settings.docker_config_path = path.clone();
    let (cache, _) = cached(&settings, CacheSettings::default());
    let image = env.image("fns/set-namespace:v0.4");
    assert_eq!(
        cache.resolve(&image, None).await.expect("miss").1,
        CacheStatus::Miss
    );
    assert_eq!(
        cache.resolve(&image, None).await.expect("hit").1,
        CacheStatus::Hit
    );
    let fetched = env.proxy.total();

    // A new credential in place, and no watcher to drop the old answers:
    // the entry itself says it was fetched with another one.
    std::fs::write(&path, serde_json::to_vec(&login("new")).expect("json")).expect("write");
    assert!(cache.resolver().credentials().reload().expect("reload"));
    let (again, status) = cache.resolve(&image, None).await.expect("refetch");
    assert_eq!(status, CacheStatus::Miss);
    assert_eq!(again.pull_secret.as_deref(), Some("auth-secret"));
    assert!(
        env.proxy.total() > fetched,
        "fetched again with the new credential"
    );
    let (_, status) = cache
        .resolve_cached(&image)
        .expect("cached")
        .expect("answer");
    assert_eq!(status, CacheStatus::Hit, "and that answer is cached");
}

#[tokio::test]
async fn new_credentials_on_disk_drop_answers_fetched_with_the_old_ones() {
    let env = PlainEnv::start().await;
    let host = env.proxy.host.clone();
    let (dir, path) =
        docker_config(&json!({"auths": {host.clone(): {"username": "u", "password": "old"}}}));
    let mut settings = env.settings();
    settings.private_registries = true;
    settings.docker_config_path = path.clone();
    let (cache, _) = cached(&settings, CacheSettings::default());
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(
        cache
            .clone()
            .follow_credentials(Default::default(), shutdown.clone()),
    );
    let image = env.image("fns/set-namespace:v0.4");
    let (first, _) = cache.resolve(&image, None).await.expect("miss");
    assert_eq!(first.pull_secret.as_deref(), Some("auth-secret"));
    assert_eq!(
        cache.resolve(&image, None).await.expect("hit").1,
        CacheStatus::Hit
    );

    // The kubelet's way: new content in a fresh dir, then swap the symlink.
    let data = dir.path().join("..2026_11_23_new");
    std::fs::create_dir(&data).expect("data dir");
    std::fs::write(
        data.join(".dockerconfigjson"),
        serde_json::to_vec(&json!({"auths": {host.clone(): {"username": "u", "password": "new"}}}))
            .expect("json"),
    )
    .expect("write");
    std::fs::remove_file(&path).expect("remove old file");
    std::os::unix::fs::symlink(data.join(".dockerconfigjson"), &path).expect("symlink");

    let mut dropped = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if cache.entry_count() == 0 {
            dropped = true;
            break;
        }
    }
    assert!(
        dropped,
        "entries fetched with the old credential are invalidated"
    );
    assert_eq!(
        cache.resolve(&image, None).await.expect("miss").1,
        CacheStatus::Miss
    );
    shutdown.cancel();
    drop(Arc::clone(cache.resolver()));
}

#[tokio::test]
async fn the_no_wait_path_agrees_with_the_full_one_and_follows_a_moved_tag() {
    let env = PlainEnv::start().await;
    let (cache, _) = cached(&env.settings(), short_ttl());
    let tag = env.image("fns/set-namespace:v0.4");
    assert!(
        cache.resolve_cached(&tag).is_none(),
        "nothing cached yet: the caller must fetch"
    );
    assert_eq!(env.proxy.total(), 0, "the no-wait path never fetches");
    assert!(
        cache.resolve_cached("Not A Reference").is_none(),
        "never cached: the full path reports it"
    );
    match cache.resolve("Not A Reference", None).await {
        Err(e) => assert_eq!(e.kind(), ErrorKind::InvalidReference),
        other => panic!("expected an invalid-reference error, got {other:?}"),
    }
    assert_eq!(env.proxy.total(), 0, "and contacts no registry");

    let (full, _) = cache.resolve(&tag, None).await.expect("miss");
    let (first, status) = cache.resolve_cached(&tag).expect("cached").expect("answer");
    assert_eq!(status, CacheStatus::Hit);
    let answer = first.answer().expect("an answer");
    assert_eq!(answer.pinned(), full.pinned);
    assert_eq!(answer.digest().to_string(), full.digest);
    assert_eq!(answer.reference.to_string(), full.reference);
    assert_eq!(answer.entrypoint().to_vec(), full.entrypoint);
    assert_eq!(first.needs_pull_secret(), full.pull_secret.is_some());
    let digest = |c: &Cached| c.answer().expect("an answer").digest().to_string();

    let moved = move_set_namespace(&env, "set-namespace v3", "/moved").await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    let (stale, status) = cache
        .resolve_cached(&tag)
        .expect("still servable")
        .expect("answer");
    assert_eq!(status, CacheStatus::Stale);
    assert_eq!(digest(&stale), full.digest);
    let mut latest = stale;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        latest = cache
            .resolve_cached(&tag)
            .expect("cached")
            .expect("answer")
            .0;
        if digest(&latest) != full.digest {
            break;
        }
    }
    assert_eq!(
        digest(&latest),
        moved.digest,
        "the no-wait path serves the refreshed entry"
    );
    let answer = latest.answer().expect("an answer");
    assert_eq!(answer.entrypoint().to_vec(), ["/moved"]);
}

/// A request that waits on another's fetch holds a small future: the fetch's
/// state (several KB) is boxed and carried by the fetching request only.
/// Under a burst of misses hundreds of resolutions wait, each on its own
/// task, and what their futures touched stays resident (BENCHMARKS.md).
#[tokio::test]
async fn a_waiting_resolution_holds_a_small_future() {
    let (cache, _) = crate::cached(&crate::settings(), CacheSettings::default());
    let resolve = cache.resolve("example.com/fns/a:v1", None);
    let for_pod = cache.resolve_for_pod("example.com/fns/a:v1");
    let sizes = (
        std::mem::size_of_val(&resolve),
        std::mem::size_of_val(&for_pod),
    );
    assert!(sizes.0 < 2048 && sizes.1 < 2048, "{sizes:?} bytes");
}

#[tokio::test]
async fn the_cache_is_bounded_in_bytes_and_an_image_may_carry_at_most_64_kib_of_arguments() {
    let env = PlainEnv::start().await;
    let pusher = Pusher::new(env.registry.url(), reqwest::Client::new());
    // 200 tags of an image whose entrypoint is 60 KiB: each a cache entry
    // holding it.
    let long = "x".repeat(60 * 1024);
    pusher
        .tags(
            "fns/long",
            "t",
            &image("long", Some(&["/fn", &long]), None, "linux/amd64", false),
            200,
        )
        .await;
    let max_bytes = 2 * 1024 * 1024;
    let settings = CacheSettings {
        max_bytes,
        ..CacheSettings::default()
    };
    let (cache, metrics) = cached(&env.settings(), settings);
    for i in 0..200 {
        let (answer, _) = cache
            .resolve(&env.image(&format!("fns/long:t{i}")), None)
            .await
            .expect("60 KiB of arguments is allowed");
        assert_eq!(answer.entrypoint[1].len(), 60 * 1024);
        assert!(
            cache.weight() <= max_bytes,
            "{} bytes after {} images",
            cache.weight(),
            i + 1
        );
    }
    assert!(
        cache.entry_count() < 40,
        "{} entries of 60 KiB in 2 MiB",
        cache.entry_count()
    );
    assert!(
        crate::metrics_text_of(&metrics).contains("fn_image_resolver_cache_evictions_total"),
        "evictions are counted"
    );

    // More than 64 KiB of arguments: refused, definitively.
    let huge = "y".repeat(1024 * 1024);
    pusher
        .image(
            "fns/huge",
            "v1",
            &image("huge", Some(&["/fn"]), Some(&[&huge]), "linux/amd64", false),
        )
        .await;
    let err = cache
        .resolve(&env.image("fns/huge:v1"), None)
        .await
        .expect_err("too much to carry");
    assert_eq!(err.kind(), ErrorKind::UnsupportedImage);
    assert!(
        err.to_string().contains("more than the 65536 accepted"),
        "{err}"
    );
    assert!(err.kind().is_definitive(), "never retried");
}
