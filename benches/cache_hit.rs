//! Cache-hit cost of the shared resolver, in process: the time from an image
//! string to a pinned answer when the cache holds it, per call, as
//! percentiles. Also the registry cost of a cold miss.
//!
//!     cargo bench --bench cache_hit
//!
//! Needs docker-registry (scripts/install-test-deps.sh): a real registry on
//! loopback serves the sample images for the warm-up.

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use fn_image_resolver::cache::{CacheSettings, CacheStatus, CachedResolver};
use fn_image_resolver::metrics::Metrics;
use fn_image_resolver::registry::{Resolver, ResolverSettings};

use common::oci::{Pusher, samples};
use common::proxy::Proxy;
use common::registry::{Auth, Registry};

const ITERATIONS: usize = 1_000_000;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    common::init_crypto();
    let registry = Registry::start(None, Auth::None);
    let images = samples();
    images
        .push(&Pusher::new(registry.url(), reqwest::Client::new()))
        .await;
    let proxy = Proxy::start(&registry.url()).await;
    let settings = ResolverSettings {
        default_prefix: "ghcr.io/kptdev/krm-functions-catalog/".into(),
        platform: "linux/amd64".parse().expect("platform"),
        private_registries: false,
        docker_config_path: "/nonexistent".into(),
        pull_secret_name: "auth-secret".into(),
        tls_ca_dir: None,
        insecure_hosts: vec![proxy.host.clone()],
        request_timeout: Duration::from_secs(10),
        resolve_timeout: Duration::from_secs(10),
        max_concurrent_fetches: 32,
        registry_config_path: None,
        wait_for_files: false,
    };
    let metrics = Metrics::new();
    let resolver =
        Arc::new(Resolver::with_observer(&settings, Some(metrics.clone())).expect("resolver"));
    let cache = CachedResolver::new(resolver, CacheSettings::default(), metrics);

    let tag = format!("{}/fns/set-namespace:v0.4", proxy.host);
    let index = format!("{}/fns/multi-arch:v1", proxy.host);
    let cold = Instant::now();
    let (_, status) = cache.resolve(&tag, None).await.expect("cold resolve");
    let cold_single = cold.elapsed();
    assert_eq!(status, CacheStatus::Miss);
    let single_requests = proxy.total();
    proxy.reset();
    cache.resolve(&index, None).await.expect("cold resolve");
    let index_requests = proxy.total();
    proxy.reset();

    for (name, image) in [("tag", &tag), ("index", &index)] {
        let mut samples = Vec::with_capacity(ITERATIONS);
        let wall = Instant::now();
        for _ in 0..ITERATIONS {
            let t = Instant::now();
            let (answer, status) = cache.resolve(image, None).await.expect("hit");
            samples.push(t.elapsed());
            debug_assert_eq!(status, CacheStatus::Hit);
            std::hint::black_box(answer);
        }
        let wall = wall.elapsed();
        samples.sort_unstable();
        println!(
            "cache hit ({name}): {ITERATIONS} calls, {:.0} calls/s on one thread; p50 {:?} p90 {:?} p99 {:?} p99.9 {:?} max {:?}",
            ITERATIONS as f64 / wall.as_secs_f64(),
            percentile(&samples, 0.50),
            percentile(&samples, 0.90),
            percentile(&samples, 0.99),
            percentile(&samples, 0.999),
            samples[samples.len() - 1],
        );
    }
    // The whole admission decision for a Porch function pod whose two images
    // are cached: parse the review, resolve, plan the patch, encode the answer.
    let fixture = common::function_pod_review(&proxy.host, &proxy.host);
    let body = fixture.into_bytes();
    let admitter = fn_image_resolver::admission::Admitter::new(
        cache.clone(),
        fn_image_resolver::admission::AdmissionSettings {
            namespace: "porch-fn-system".into(),
            function_label: "fn.kpt.dev/image".into(),
            pull_secret: "auth-secret".into(),
            failure_mode: fn_image_resolver::admission::FailureMode::Open,
            pin_function_image: true,
            default_timeout: Duration::from_secs(10),
            max_images: 32,
        },
    );
    let first = admitter.review(&body, None).await.expect("review");
    assert!(first.patch().is_some());
    // That first review fetched the init container's image; the rest are hits.
    proxy.reset();
    const REVIEWS: usize = 100_000;
    let mut samples = Vec::with_capacity(REVIEWS);
    let wall = Instant::now();
    for _ in 0..REVIEWS {
        let t = Instant::now();
        let answer = admitter.review(&body, None).await.expect("review");
        let bytes = serde_json::to_vec(&answer).expect("encode");
        samples.push(t.elapsed());
        std::hint::black_box(bytes);
    }
    let wall = wall.elapsed();
    samples.sort_unstable();
    println!(
        "admission decision (function pod, 2 cached images, {} bytes): {REVIEWS} reviews, {:.0}/s on one thread; p50 {:?} p90 {:?} p99 {:?} p99.9 {:?}",
        body.len(),
        REVIEWS as f64 / wall.as_secs_f64(),
        percentile(&samples, 0.50),
        percentile(&samples, 0.90),
        percentile(&samples, 0.99),
        percentile(&samples, 0.999),
    );
    assert_eq!(proxy.total(), 0, "hits never reach the registry");
    println!(
        "cold miss, single-platform tag: {single_requests} registry requests, {cold_single:?} (includes the one-time TLS probe of the plain-HTTP host)"
    );
    println!("cold miss, two-platform index: {index_requests} registry requests");
}
