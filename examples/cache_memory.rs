//! Fills a running `fn-image-resolver serve` with N distinct cached images,
//! for measuring its resident memory per entry (scripts/bench-memory.sh).
//! Pushes N tags of one sample image to a registry started here, then asks
//! the server's resolver endpoint for every tag (batches of 100).
//!
//!     cargo run --release --example cache_memory -- REGISTRY_PORT RESOLVER_URL N
//!
//! With `FNIR_BENCH_STORAGE=DIR` the registry keeps its content in DIR and
//! the push is skipped when DIR already holds N tags (pushing 100k tags
//! takes minutes; the measurement does not need it again).

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
    let storage = std::env::var_os("FNIR_BENCH_STORAGE").map(std::path::PathBuf::from);
    let registry = Registry::start_on(port, None, Auth::None, storage.as_deref());
    let host = registry.host.clone();
    let client = reqwest::Client::new();
    let pushed = storage.as_ref().map(|dir| dir.join(format!("pushed-{n}")));
    if pushed.as_ref().is_some_and(|marker| marker.exists()) {
        eprintln!("{n} tags already in the registry");
    } else {
        let pusher = Pusher::new(registry.url(), client.clone());
        let sample = image("memory", Some(&["/fn"]), None, "linux/amd64", false);
        let started = Instant::now();
        pusher.tags("fns/memory", "t", &sample, n).await;
        eprintln!("pushed {n} tags in {:?}", started.elapsed());
        if let Some(marker) = &pushed {
            std::fs::write(marker, "").expect("write the push marker");
        }
    }
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
