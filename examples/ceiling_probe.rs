//! The ceiling for webhook throughput on this machine: a bare axum + rustls
//! server that parses the AdmissionReview as a `serde_json::Value` and
//! builds a realistic patch (every container's image pinned to a fixed
//! digest, one annotation), nothing else: no cache, no registry, no logging.
//! Benchmarked in the same run as fn-image-resolver, so the ratio of the two
//! is always measured, never quoted from elsewhere.
//!
//!     cargo run --release --example ceiling_probe -- 127.0.0.1:8444 tls.crt tls.key

use axum::Json;
use axum::routing::post;
use base64::Engine as _;
use serde_json::{Value, json};

// The same allocator as the server, so the ratio measures our work only.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DIGEST: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

/// A JSON Patch like fn-image-resolver's for a function pod.
fn patch(pod: &Value) -> Vec<Value> {
    let mut ops = Vec::new();
    let mut originals = serde_json::Map::new();
    for field in ["initContainers", "containers"] {
        for (i, c) in pod["spec"][field]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            if let Some(image) = c["image"].as_str() {
                ops.push(json!({"op": "add", "path": format!("/spec/{field}/{i}/image"), "value": format!("{image}@{DIGEST}")}));
                originals.insert(
                    c["name"].as_str().unwrap_or_default().to_string(),
                    json!(image),
                );
            }
        }
    }
    ops.push(json!({"op": "add", "path": "/metadata/annotations/probe~1original-images", "value": Value::Object(originals).to_string()}));
    ops
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let addr: std::net::SocketAddr = args.next().expect("ADDR").parse().expect("ADDR");
    let cert = args.next().expect("CERT");
    let key = args.next().expect("KEY");
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let app = axum::Router::new().route(
        "/mutate",
        post(move |body: axum::body::Bytes| async move {
            let review: Value = match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(_) => return Json(json!({"error": "bad review"})),
            };
            let request = &review["request"];
            let ops = patch(&request["object"]);
            let encoded = base64::engine::general_purpose::STANDARD
                .encode(serde_json::to_vec(&ops).unwrap_or_default());
            Json::<Value>(json!({
                "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                "response": {"uid": request["uid"], "allowed": true, "patchType": "JSONPatch", "patch": encoded}
            }))
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
