//! Real components for the integration tests: Debian's `docker-registry`
//! (distribution 2.8) in plain, TLS, Basic-auth and token-auth setups, a token
//! server, a counting and fault-injecting proxy, and an OCI image builder.
#![allow(dead_code)]

pub mod cluster;
pub mod k8s;
pub mod oci;
pub mod proxy;
pub mod registry;
pub mod token;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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

/// A tool the tests need from outside Debian: `$env_var` when set, else what
/// `script` (relative to the crate) builds or finds in its cache, the path
/// it prints on its last line. Go must be installed for the script.
pub fn built_tool(env_var: &str, script: &str) -> PathBuf {
    if let Ok(path) = std::env::var(env_var) {
        return PathBuf::from(path);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(script);
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    assert!(out.status.success(), "{} failed", script.display());
    let stdout = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(
        stdout
            .lines()
            .last()
            .unwrap_or_else(|| panic!("{} printed no path", script.display()))
            .trim(),
    )
}

/// A temp dir holding `ca.crt`, `ca.key`, `tls.crt` and `tls.key` (as `certs`
/// writes them) for a server on 127.0.0.1.
pub fn loopback_certs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    fn_image_resolver::certs::write_bundle(dir.path(), &["127.0.0.1".to_string()], false)
        .expect("certs");
    dir
}
