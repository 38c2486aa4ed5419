//! Starts Debian's `docker-registry` on 127.0.0.1 with the sample function
//! images the tests use, prints their references, and runs until Ctrl-C.
//!
//!     cargo run --example sample_registry -- [PORT [BURST_TAGS]]
//!
//! PORT defaults to 5000. BURST_TAGS (default 0) more tags `fns/burst:t0`,
//! `t1`, ... of one image, for benchmarks that need many distinct images.

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use common::oci::{Pusher, samples};
use common::registry::{Auth, Registry};

#[tokio::main]
async fn main() {
    let port: u16 = std::env::args()
        .nth(1)
        .map(|p| p.parse().expect("PORT must be a number"))
        .unwrap_or(5000);
    common::init_crypto();
    let registry = Registry::start_on(port, None, Auth::None, None);
    let images = samples();
    images
        .push(&Pusher::new(registry.url(), reqwest::Client::new()))
        .await;
    let burst: usize = std::env::args()
        .nth(2)
        .map(|n| n.parse().expect("BURST_TAGS must be a number"))
        .unwrap_or(0);
    let sample = common::oci::image("burst", Some(&["/fn"]), None, "linux/amd64", false);
    Pusher::new(registry.url(), reqwest::Client::new())
        .tags("fns/burst", "t", &sample, burst)
        .await;
    let host = &registry.host;
    println!("sample registry on http://{host} (plain HTTP: pass --insecure-registry {host})");
    for (image, digest) in [
        ("fns/set-namespace:v0.4", &images.entrypoint.digest),
        ("fns/cmd-only:v1", &images.cmd_only.digest),
        ("fns/no-entrypoint:v1", &images.neither.digest),
        ("fns/multi-arch:v1", &images.multi.digest),
    ] {
        println!("  {host}/{image}  {digest}");
    }
    if burst > 0 {
        println!("  {host}/fns/burst:t0 ... t{}", burst - 1);
    }
    println!("ready");
    // Stop on Ctrl-C or SIGTERM alike, so the registry process is never orphaned.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    drop(registry);
}
