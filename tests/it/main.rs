//! Integration tests against real components (see tests/common).
//! One test binary so the crate and its dependencies are linked once.

#[path = "../common/mod.rs"]
mod common;

mod cache;
mod caller_auth;
mod cli;
mod crane;
mod credential_markers;
mod docs;
mod e2e;
mod hardening;
mod layers;
mod managed_tls;
mod mirror;
pub mod monitoring;
mod node;
mod quickstart;
mod referee;
pub mod resolve_auth;
mod resolve_hosts;
mod resolve_plain;
mod resolve_shapes;
mod resolve_tls;
mod serve;
mod webhook;

use std::path::PathBuf;
use std::time::Duration;

use std::sync::Arc;

use fn_image_resolver::app::ServeConfig;
use fn_image_resolver::cache::{CacheSettings, CachedResolver};
use fn_image_resolver::metrics::Metrics;
use fn_image_resolver::registry::{Resolver, ResolverSettings};
use fn_image_resolver::server::HttpLimits;

use common::oci::{Pusher, Samples, samples};
use common::proxy::Proxy;
use common::registry::{Auth, Registry};

pub const PREFIX: &str = "ghcr.io/kptdev/krm-functions-catalog/";

/// Defaults like the CLI's, private registries off, nothing insecure.
pub fn settings() -> ResolverSettings {
    ResolverSettings {
        default_prefix: PREFIX.into(),
        platform: "linux/amd64".parse().expect("platform"),
        private_registries: false,
        docker_config_path: PathBuf::from("/nonexistent/.dockerconfigjson"),
        pull_secret_name: "auth-secret".into(),
        tls_ca_dir: None,
        insecure_hosts: Vec::new(),
        request_timeout: Duration::from_secs(10),
        resolve_timeout: Duration::from_secs(10),
        max_concurrent_fetches: 32,
        registry_config_path: None,
        wait_for_files: false,
    }
}

pub fn resolver(settings: &ResolverSettings) -> Resolver {
    common::init_crypto();
    Resolver::new(settings).expect("resolver")
}

/// A plain-HTTP registry with the sample images, behind a counting proxy.
#[derive(Debug)]
pub struct PlainEnv {
    pub registry: Registry,
    pub proxy: Proxy,
    pub samples: Samples,
}

impl PlainEnv {
    pub async fn start() -> Self {
        common::init_crypto();
        let registry = Registry::start(None, Auth::None);
        let samples = samples();
        samples
            .push(&Pusher::new(registry.url(), reqwest::Client::new()))
            .await;
        let proxy = Proxy::start(&registry.url()).await;
        Self {
            registry,
            proxy,
            samples,
        }
    }

    /// `PROXY_HOST/path`
    pub fn image(&self, path: &str) -> String {
        format!("{}/{path}", self.proxy.host)
    }

    /// Settings that allow plain HTTP to the proxy.
    pub fn settings(&self) -> ResolverSettings {
        let mut s = settings();
        s.insecure_hosts = vec![self.proxy.host.clone()];
        s
    }
}

/// Writes a Docker config into a temp dir and returns (dir, path).
pub fn docker_config(json: &serde_json::Value) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(".dockerconfigjson");
    std::fs::write(&path, serde_json::to_vec(json).expect("json")).expect("write config");
    (dir, path)
}

pub fn basic_auth(user: &str, pass: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
}

/// A cached resolver over `settings`, with its metrics.
pub fn cached(settings: &ResolverSettings, cache: CacheSettings) -> (CachedResolver, Arc<Metrics>) {
    common::init_crypto();
    let metrics = Metrics::new();
    let resolver = Resolver::with_observer(settings, Some(metrics.clone())).expect("resolver");
    (
        CachedResolver::new(Arc::new(resolver), cache, metrics.clone()),
        metrics,
    )
}

/// `serve`'s configuration for `settings` and `cache`: the resolver endpoint
/// on a free loopback port, no webhook, no cluster.
pub fn serve_config(settings: &ResolverSettings, cache: CacheSettings) -> ServeConfig {
    ServeConfig {
        resolver: settings.clone(),
        cache,
        admission: admission_settings(),
        http: HttpLimits::default(),
        resolver_listen: "127.0.0.1:0".parse().expect("addr"),
        max_batch: 10,
        resolver_allowed_registries: Vec::new(),
        webhook: None,
        mirror: None,
        registration: None,
        prewarm: Default::default(),
    }
}

/// The resolver endpoint: `serve` run in process, on a loopback port.
#[derive(Debug)]
pub struct Endpoint {
    pub base: String,
    pub cache: CachedResolver,
    pub metrics: Arc<Metrics>,
    pub running: fn_image_resolver::app::Running,
}

impl Endpoint {
    pub async fn start(settings: &ResolverSettings, cache: CacheSettings) -> Self {
        common::init_crypto();
        let running = fn_image_resolver::app::start(serve_config(settings, cache))
            .await
            .expect("serve starts");
        Self {
            base: format!("http://{}", running.resolver_addr),
            cache: running.cache.clone(),
            metrics: running.metrics.clone(),
            running,
        }
    }

    pub fn url(&self, image: &str) -> String {
        let mut url = url::Url::parse(&format!("{}/v1/resolve", self.base)).expect("url");
        url.query_pairs_mut().append_pair("image", image);
        url.to_string()
    }
}

pub fn admission_settings() -> fn_image_resolver::admission::AdmissionSettings {
    fn_image_resolver::admission::AdmissionSettings {
        namespace: "porch-fn-system".into(),
        function_label: "fn.kpt.dev/image".into(),
        pull_secret: "auth-secret".into(),
        failure_mode: fn_image_resolver::admission::FailureMode::Open,
        pin_function_image: true,
        max_images: 32,
        default_timeout: Duration::from_secs(10),
    }
}

/// `serve` with the webhook on HTTPS port `webhook` (certificate and key from
/// `certs`, as written by `certs::write_bundle`) and the resolver endpoint on
/// loopback port `resolver`. Callers add their flags, then spawn.
pub fn serve_command(
    certs: &std::path::Path,
    webhook: u16,
    resolver: u16,
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_fn-image-resolver"));
    command
        .arg("serve")
        .args(["--listen", &format!("127.0.0.1:{webhook}")])
        .args(["--resolver-listen", &format!("127.0.0.1:{resolver}")])
        .arg(format!(
            "--tls-cert-file={}",
            certs.join("tls.crt").display()
        ))
        .arg(format!(
            "--tls-key-file={}",
            certs.join("tls.key").display()
        ))
        .kill_on_drop(true);
    command
}

/// The Prometheus text a server publishes at `base` + `/metrics`.
pub async fn metrics_text(base: &str) -> String {
    reqwest::get(format!("{base}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text")
}

/// An HTTPS client that trusts only `ca_pem`.
pub fn client_trusting(ca_pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("ca"))
        .tls_built_in_root_certs(false)
        .build()
        .expect("client")
}

/// The Prometheus text of `metrics`, as `/metrics` would serve it.
pub fn metrics_text_of(metrics: &Metrics) -> String {
    metrics.encode()
}
