//! A proxy that makes a registry slow: every request waits DELAY_MS first.
//! For benchmarks (scripts/bench-webhook.sh); the tests use the same proxy.
//!
//!     cargo run --example slow_proxy -- http://127.0.0.1:5000 100

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::time::Duration;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let upstream = args.next().expect("UPSTREAM_URL");
    let delay: u64 = args.next().expect("DELAY_MS").parse().expect("DELAY_MS");
    common::init_crypto();
    let proxy = common::proxy::Proxy::start(&upstream).await;
    proxy.set_delay(Duration::from_millis(delay));
    println!("ready {}", proxy.host);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
