//! A load generator for admission webhooks: POSTs AdmissionReviews of a Porch
//! function pod over HTTPS keep-alive to any `--url` (ours or another
//! implementation), from `--concurrency` connections, for `--duration` or
//! `--requests`, and reports throughput, latency percentiles and errors.
//!
//!     cargo run --release --example loadgen -- --url https://127.0.0.1:8443/mutate?timeout=10s \
//!         --ca-file ca.crt --registry 127.0.0.1:5000 --concurrency 16 --duration 10s [--json]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{Value, json};

const FIXTURE: &str = include_str!("../tests/fixtures/function-pod-review.json");

#[derive(Debug, Parser)]
struct Args {
    /// Webhook URL, e.g. https://127.0.0.1:8443/mutate?timeout=10s
    #[arg(long)]
    url: String,
    /// CA that signed the webhook's certificate (PEM); system roots otherwise.
    #[arg(long)]
    ca_file: Option<std::path::PathBuf>,
    /// Registry host written into the fixture's images.
    #[arg(long, default_value = "127.0.0.1:5000")]
    registry: String,
    /// Image (path:tag under --registry) of the function container.
    #[arg(long, default_value = "fns/set-namespace:v0.4")]
    image: String,
    /// Concurrent connections, each sending one request at a time.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// How long to send.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Stop after this many requests instead (bounded either way).
    #[arg(long)]
    requests: Option<u64>,
    /// Print a JSON summary instead of text.
    #[arg(long)]
    json: bool,
    /// Percentage of reviews (0-100) whose function image is one not asked
    /// for before: `--fresh-image` plus a counter (a cold miss each).
    #[arg(long, default_value_t = 0)]
    fresh_percent: u64,
    /// Image (path:tag-prefix under --registry) of the fresh reviews, e.g.
    /// `fns/burst:t` for tags t0, t1, ... pushed by `sample_registry`.
    #[arg(long, default_value = "fns/burst:t")]
    fresh_image: String,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut builder = reqwest::Client::builder()
        .http1_only()
        .pool_max_idle_per_host(args.concurrency)
        .timeout(Duration::from_secs(30));
    if let Some(ca) = &args.ca_file {
        let pem = std::fs::read(ca).expect("read --ca-file");
        builder =
            builder.add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("CA PEM"));
    }
    let client = builder.build().expect("client");
    let mut review: Value = serde_json::from_str(
        &FIXTURE
            .replace("{{WRAPPER_REGISTRY}}", &args.registry)
            .replace("{{REGISTRY}}", &args.registry),
    )
    .expect("fixture");
    review["request"]["object"]["spec"]["containers"][0]["image"] =
        json!(format!("{}/{}", args.registry, args.image));
    let body = Arc::new(serde_json::to_vec(&review).expect("json"));

    let fresh_body = {
        let review = review.clone();
        let prefix = format!("{}/{}", args.registry, args.fresh_image);
        move |n: u64| {
            let mut review = review.clone();
            let function = &mut review["request"]["object"]["spec"]["containers"][0];
            function["image"] = json!(format!("{prefix}{n}"));
            // The burst images' entrypoint, as Porch would have written it.
            function["args"] = json!([
                "--port",
                "9446",
                "--max-request-body-size",
                "6291456",
                "--",
                "/fn"
            ]);
            serde_json::to_vec(&review).expect("json")
        }
    };
    let fresh_body = Arc::new(fresh_body);
    // Every k-th request overall is fresh.
    let fresh_every = (args.fresh_percent > 0).then(|| 100 / args.fresh_percent.min(100));
    let fresh_count = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let limit = args.requests.unwrap_or(u64::MAX);
    let deadline = Instant::now() + args.duration;
    let started = Instant::now();
    let workers: Vec<_> = (0..args.concurrency)
        .map(|_| {
            let (client, body, url) = (client.clone(), body.clone(), args.url.clone());
            let (sent, errors) = (sent.clone(), errors.clone());
            let (fresh_body, fresh_count) = (fresh_body.clone(), fresh_count.clone());
            tokio::spawn(async move {
                let mut hist = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
                let mut fresh_hist = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
                loop {
                    let n = sent.fetch_add(1, Ordering::SeqCst);
                    if Instant::now() >= deadline || n >= limit {
                        break;
                    }
                    let fresh = fresh_every.is_some_and(|k| n % k == k - 1);
                    let payload = if fresh {
                        fresh_body(fresh_count.fetch_add(1, Ordering::SeqCst))
                    } else {
                        body.as_ref().clone()
                    };
                    let t = Instant::now();
                    let ok = match client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(payload)
                        .send()
                        .await
                    {
                        Ok(resp) if resp.status().is_success() => resp
                            .json::<Value>()
                            .await
                            .is_ok_and(|v| v["response"]["allowed"] == json!(true)),
                        _ => false,
                    };
                    let took = t.elapsed().as_micros() as u64;
                    let _ = hist.record(took);
                    if fresh {
                        let _ = fresh_hist.record(took);
                    }
                    if !ok {
                        errors.fetch_add(1, Ordering::SeqCst);
                    }
                }
                (hist, fresh_hist)
            })
        })
        .collect();
    let mut hist = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
    let mut fresh_hist = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
    for w in workers {
        let (all, fresh) = w.await.expect("worker");
        hist.add(all).expect("merge");
        fresh_hist.add(fresh).expect("merge");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let count = hist.len();
    let summary = json!({
        "url": args.url,
        "concurrency": args.concurrency,
        "requests": count,
        "errors": errors.load(Ordering::SeqCst),
        "seconds": elapsed,
        "throughput": count as f64 / elapsed,
        "latency_us": {
            "p50": hist.value_at_quantile(0.50), "p90": hist.value_at_quantile(0.90),
            "p99": hist.value_at_quantile(0.99), "p99.9": hist.value_at_quantile(0.999), "max": hist.max(),
        },
        "fresh": {
            "requests": fresh_hist.len(),
            "latency_us": {"p50": fresh_hist.value_at_quantile(0.50), "p99": fresh_hist.value_at_quantile(0.99), "max": fresh_hist.max()}
        }
    });
    if args.json {
        println!("{summary}");
    } else {
        println!(
            "{} requests in {:.2}s from {} connections: {:.0} reviews/s, {} errors; latency p50 {}µs p90 {}µs p99 {}µs p99.9 {}µs max {}µs",
            count,
            elapsed,
            args.concurrency,
            count as f64 / elapsed,
            summary["errors"],
            summary["latency_us"]["p50"],
            summary["latency_us"]["p90"],
            summary["latency_us"]["p99"],
            summary["latency_us"]["p99.9"],
            summary["latency_us"]["max"],
        );
        if !fresh_hist.is_empty() {
            println!(
                "    of which {} fresh images (cold misses): p50 {}µs p99 {}µs max {}µs",
                fresh_hist.len(),
                fresh_hist.value_at_quantile(0.50),
                fresh_hist.value_at_quantile(0.99),
                fresh_hist.max()
            );
        }
    }
}
