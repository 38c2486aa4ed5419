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
    let mut review: Value =
        serde_json::from_str(&FIXTURE.replace("{{REGISTRY}}", &args.registry)).expect("fixture");
    review["request"]["object"]["spec"]["containers"][0]["image"] =
        json!(format!("{}/{}", args.registry, args.image));
    let body = Arc::new(serde_json::to_vec(&review).expect("json"));

    let sent = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let limit = args.requests.unwrap_or(u64::MAX);
    let deadline = Instant::now() + args.duration;
    let started = Instant::now();
    let workers: Vec<_> = (0..args.concurrency)
        .map(|_| {
            let (client, body, url) = (client.clone(), body.clone(), args.url.clone());
            let (sent, errors) = (sent.clone(), errors.clone());
            tokio::spawn(async move {
                let mut hist = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
                while Instant::now() < deadline && sent.fetch_add(1, Ordering::SeqCst) < limit {
                    let t = Instant::now();
                    let ok = match client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body.as_ref().clone())
                        .send()
                        .await
                    {
                        Ok(resp) if resp.status().is_success() => resp
                            .json::<Value>()
                            .await
                            .is_ok_and(|v| v["response"]["allowed"] == json!(true)),
                        _ => false,
                    };
                    let _ = hist.record(t.elapsed().as_micros() as u64);
                    if !ok {
                        errors.fetch_add(1, Ordering::SeqCst);
                    }
                }
                hist
            })
        })
        .collect();
    let mut hist = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
    for w in workers {
        hist.add(w.await.expect("worker")).expect("merge");
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
    }
}
