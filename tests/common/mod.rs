//! Real components for the integration tests: Debian's `docker-registry`
//! (distribution 2.8) in plain, TLS, Basic-auth and token-auth setups, a token
//! server, a counting and fault-injecting proxy, and an OCI image builder.
#![allow(dead_code)]

pub mod k8s;
pub mod oci;
pub mod proxy;
pub mod registry;
pub mod token;

use std::net::TcpListener;

/// The AdmissionReview of a Porch function pod as the function runner makes
/// it and the API server sends it (tests/fixtures/function-pod-review.json):
/// the function image `REGISTRY/fns/set-namespace:v0.4` with its entrypoint
/// already after `--`, and the wrapper-server init container's image
/// `WRAPPER_REGISTRY/nephio/porch-wrapper-server:v4`.
pub fn function_pod_review(registry: &str, wrapper_registry: &str) -> String {
    include_str!("../fixtures/function-pod-review.json")
        .replace("{{WRAPPER_REGISTRY}}", wrapper_registry)
        .replace("{{REGISTRY}}", registry)
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

/// Installs the process-wide rustls provider (idempotent).
pub fn init_crypto() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
