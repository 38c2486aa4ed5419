//! Fills a running `fn-image-resolver serve` with N distinct cached images,
//! for measuring its resident memory per entry (scripts/bench-memory.sh).
//! Pushes N tags of one sample image to a registry started here, then asks
//! the server's resolver endpoint for every tag (batches of 100).
//!
//!     cargo run --release --example cache_memory -- REGISTRY_PORT RESOLVER_URL N

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::time::Instant;

use common::oci::{Pusher, image};
use common::registry::{Auth, Registry};
use futures_util::StreamExt as _;
use serde_json::json;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let port: u16 = args.next().expect("REGISTRY_PORT").parse().expect("port");
    let resolver = args.next().expect("RESOLVER_URL");
    let n: usize = args.next().expect("N").parse().expect("N");
    common::init_crypto();
    let registry = Registry::start_on(port, None, Auth::None, None);
    let host = registry.host.clone();
    let client = reqwest::Client::new();
    let pusher = Pusher::new(registry.url(), client.clone());
    let sample = image("memory", Some(&["/fn"]), None, "linux/amd64", false);
    let started = Instant::now();
    pusher.tags("fns/memory", "t", &sample, n).await;
    eprintln!("pushed {n} tags in {:?}", started.elapsed());
    let started = Instant::now();
    let batches: Vec<Vec<String>> = (0..n)
        .map(|i| format!("{host}/fns/memory:t{i}"))
        .collect::<Vec<_>>()
        .chunks(100)
        .map(<[String]>::to_vec)
        .collect();
    let failures = futures_util::stream::iter(batches)
        .map(|images| {
            let client = client.clone();
            let url = format!("{resolver}/v1/resolve");
            async move {
                let body: serde_json::Value = client
                    .post(url)
                    .json(&json!({ "images": images }))
                    .send()
                    .await
                    .expect("resolve")
                    .json()
                    .await
                    .expect("json");
                body["results"].as_array().map_or(100, |r| {
                    r.iter().filter(|x| x.get("error").is_some()).count()
                })
            }
        })
        .buffer_unordered(8)
        .fold(0usize, |acc, f| async move { acc + f })
        .await;
    eprintln!(
        "resolved {n} images in {:?}, {failures} failures",
        started.elapsed()
    );
    println!("done {n} {failures}");
    drop(registry);
}
