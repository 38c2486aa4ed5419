//! The ceiling for webhook throughput on this machine: a bare axum + rustls
//! server that parses the AdmissionReview and returns a fixed patch, nothing
//! else. Benchmarked in the same run as fn-image-resolver, so the ratio of
//! the two is always measured, never quoted from elsewhere.
//!
//!     cargo run --release --example ceiling_probe -- 127.0.0.1:8444 tls.crt tls.key

use std::sync::Arc;

use axum::Json;
use axum::routing::post;
use base64::Engine as _;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionReview};
use serde_json::{Value, json};

// The same allocator as the server, so the ratio measures our work only.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let addr: std::net::SocketAddr = args.next().expect("ADDR").parse().expect("ADDR");
    let cert = args.next().expect("CERT");
    let key = args.next().expect("KEY");
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let patch = Arc::new(
        base64::engine::general_purpose::STANDARD
            .encode(br#"[{"op":"add","path":"/metadata/annotations/probe","value":"x"}]"#),
    );
    let app = axum::Router::new().route(
        "/mutate",
        post(move |body: axum::body::Bytes| {
            let patch = patch.clone();
            async move {
                let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(&body) {
                    Ok(r) => r,
                    Err(_) => return Json(json!({"error": "bad review"})),
                };
                let request: AdmissionRequest<DynamicObject> = match review.try_into() {
                    Ok(r) => r,
                    Err(_) => return Json(json!({"error": "no request"})),
                };
                Json::<Value>(json!({
                    "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                    "response": {"uid": request.uid, "allowed": true, "patchType": "JSONPatch", "patch": patch.as_str()}
                }))
            }
        }),
    );
    let config = axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
        .await
        .expect("TLS");
    println!("ready");
    axum_server::bind_rustls(addr, config)
        .serve(app.into_make_service())
        .await
        .expect("serve");
}
