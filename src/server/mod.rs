//! The long-running process: the resolver endpoint, health, readiness and
//! metrics, the credential watcher, and graceful shutdown.

mod api;
pub mod auth;
pub mod tls;
mod watch;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cache::CachedResolver;
use crate::metrics::Metrics;

pub use api::{ApiError, error_json, status_of};

/// Readiness checks by name; the process is ready when all are.
#[derive(Debug, Default)]
pub struct Readiness {
    checks: Mutex<BTreeMap<&'static str, Result<(), String>>>,
    /// Shutting down: every answer says `Connection: close`.
    draining: std::sync::atomic::AtomicBool,
}

impl Readiness {
    /// SIGTERM: not ready from now on, and clients are told to re-dial
    /// (another replica) after their current request.
    pub fn begin_shutdown(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Release);
        self.set("shutdown", Err("shutting down".into()));
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn set(&self, check: &'static str, state: Result<(), String>) {
        self.checks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(check, state);
    }

    fn snapshot(&self) -> (bool, serde_json::Value) {
        let checks = self
            .checks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let ready = checks.values().all(Result::is_ok);
        let detail: serde_json::Map<String, serde_json::Value> = checks
            .iter()
            .map(|(name, state)| {
                let v = match state {
                    Ok(()) => json!({"ready": true}),
                    Err(reason) => json!({"ready": false, "reason": reason}),
                };
                (name.to_string(), v)
            })
            .collect();
        (ready, json!({"ready": ready, "checks": detail}))
    }
}

/// What every handler can reach.
#[derive(Debug)]
pub struct AppState {
    pub admitter: crate::admission::Admitter,
    pub cache: CachedResolver,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    pub max_batch: usize,
    /// Normalized registry hosts `/v1/resolve` may ask; empty: any.
    pub allowed_registries: Vec<String>,
}

/// Largest request body accepted (a batch of image references).
const MAX_BODY_BYTES: usize = 256 * 1024;

/// Largest AdmissionReview accepted: the API server caps objects near 1.5 MiB
/// and a review can carry two of them.
const MAX_REVIEW_BYTES: usize = 4 * 1024 * 1024;

/// The webhook listener's routes: `/mutate` with health, readiness and
/// metrics, and `/v1/resolve` for authenticated callers when `auth` is set.
pub fn webhook_router(state: Arc<AppState>, auth: Option<auth::Authenticator>) -> Router {
    let mut router = Router::new();
    if let Some(tokens) = auth {
        router = router.route(
            "/v1/resolve",
            get(api::resolve_one)
                .post(api::resolve_batch)
                .layer(middleware::from_fn_with_state(tokens, auth::require_token)),
        );
    }
    router
        .route("/mutate", axum::routing::post(mutate))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_REVIEW_BYTES))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

async fn mutate(
    State(state): State<Arc<AppState>>,
    axum::extract::Query(query): axum::extract::Query<std::collections::HashMap<String, String>>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let error = |status: StatusCode, message: String| {
        ApiError::new(status, "bad-request", message).into_response()
    };
    let body = match body {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the AdmissionReview is larger than {MAX_REVIEW_BYTES} bytes"),
            );
        }
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    // The API server tells us its budget: `?timeout=10s`.
    let timeout = query
        .get("timeout")
        .and_then(|t| humantime::parse_duration(t).ok());
    match state.admitter.review(&body, timeout).await {
        Ok(review) => {
            state.metrics.admission_review(review.outcome);
            axum::Json(review).into_response()
        }
        Err(e) => {
            state.metrics.admission_review("invalid");
            error(StatusCode::BAD_REQUEST, e.to_string())
        }
    }
}

/// The resolver API with health, readiness and metrics.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route(
            "/v1/resolve",
            get(api::resolve_one).post(api::resolve_batch),
        )
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let (ready, detail) = state.readiness.snapshot();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(detail)).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    state
        .metrics
        .cache_entries
        .set(state.cache.entry_count() as i64);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

async fn not_found() -> Response {
    ApiError::new(StatusCode::NOT_FOUND, "bad-request", "no such route").into_response()
}

/// Counts every request by matched route (bounded) and status.
async fn observe(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let started = Instant::now();
    // A guard, so a request dropped mid-way (client gone, timeout) is
    // still counted out.
    let _in_flight = state.metrics.request_started();
    let mut response = next.run(request).await;
    state
        .metrics
        .http_request(&route, response.status().as_str(), started.elapsed());
    if state.readiness.is_draining() {
        // hyper closes the connection after this answer: a client holding a
        // keep-alive connection re-dials, and reaches a replica that stays.
        response.headers_mut().insert(
            header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    response
}

/// Resolves once SIGTERM or SIGINT arrives.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the server");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(
        "--resolver-listen {0} is not a loopback address: the plain-HTTP resolver endpoint is for a sidecar on 127.0.0.1 or [::1] only (an open resolver is a credential oracle)"
    )]
    NotLoopback(SocketAddr),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("server on {addr} failed: {source}")]
    Serve {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Time limits every listener puts on its clients, so a slow or stalled
/// client cannot hold a connection (and its memory) forever.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// From connection (or the TLS handshake's end) to the end of a
    /// request's headers; also bounds the TLS handshake itself.
    pub header_read_timeout: Duration,
    /// For a whole request once its headers are in: body upload and answer.
    pub request_timeout: Duration,
    /// After shutdown, how long in-flight requests may still take.
    pub drain: Duration,
    /// After SIGTERM and before the listeners stop accepting: how long they
    /// keep serving (not ready, `Connection: close`) while the endpoints
    /// drop this pod.
    pub delay: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            drain: Duration::from_secs(20),
            delay: Duration::from_secs(5),
        }
    }
}

/// Answers 408 when a request (body included) takes longer than allowed.
/// Resolutions it started keep running and fill the cache.
fn with_request_timeout(app: Router, limit: Duration) -> Router {
    app.layer(middleware::from_fn(
        move |request: Request, next: Next| async move {
            match tokio::time::timeout(limit, next.run(request)).await {
                Ok(response) => response,
                Err(_) => ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "timeout",
                    format!(
                        "the request took longer than {}ms (body upload included)",
                        limit.as_millis()
                    ),
                )
                .into_response(),
            }
        },
    ))
}

/// Stops `server` gracefully when `shutdown` fires, draining for `drain`.
fn drain_on<Acc>(
    server: axum_server::Server<SocketAddr, Acc>,
    shutdown: CancellationToken,
    drain: Duration,
) -> axum_server::Server<SocketAddr, Acc> {
    let handle = axum_server::Handle::new();
    let stopper = handle.clone();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        stopper.graceful_shutdown(Some(drain));
    });
    server.handle(handle)
}

/// HTTP/1.1 only, with every phase of a connection under a time limit.
///
/// hyper's HTTP/1 header timeout runs whenever the connection waits for a
/// request head: the first one, and again after each answer (so a quiet
/// keep-alive connection is closed after the same limit). hyper has no such
/// timeout for HTTP/2, where a client could hold a connection open forever
/// after its first request (by idling, or by never finishing a header
/// block), so HTTP/2 is not offered: like controller-runtime's webhook
/// server, which turned HTTP/2 off after the 2023 Rapid Reset advisories.
/// The API server then uses HTTP/1.1 with its keep-alive pool.
fn http1_bounded<Acc>(
    server: axum_server::Server<SocketAddr, Acc>,
    limits: HttpLimits,
) -> axum_server::Server<SocketAddr, Acc> {
    let mut server = server.http1_only();
    server
        .http_builder()
        .http1()
        .header_read_timeout(limits.header_read_timeout);
    // Also bounds the time from accept (or the TLS handshake's end) to the
    // first request, before hyper's own timer starts.
    server.first_request_timeout(limits.header_read_timeout)
}

fn bind_std(addr: SocketAddr) -> Result<std::net::TcpListener, ServeError> {
    std::net::TcpListener::bind(addr).map_err(|source| ServeError::Bind { addr, source })
}

/// Serves `app` in plain HTTP on a loopback `addr` until `shutdown` fires,
/// then lets in-flight requests finish (for at most `limits.drain`).
pub async fn serve_loopback(
    addr: SocketAddr,
    app: Router,
    limits: HttpLimits,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    if !addr.ip().is_loopback() {
        return Err(ServeError::NotLoopback(addr));
    }
    let listener = bind_std(addr)?;
    let local = listener.local_addr().unwrap_or(addr);
    let server =
        axum_server::from_tcp(listener).map_err(|source| ServeError::Bind { addr, source })?;
    let server = http1_bounded(server, limits);
    info!(addr = %local, "resolver endpoint listening (plain HTTP, loopback)");
    drain_on(server, shutdown, limits.drain)
        .serve(with_request_timeout(app, limits.request_timeout).into_make_service())
        .await
        .map_err(|source| ServeError::Serve { addr, source })
}

pub use watch::watch_credentials;

/// Serves `app` over HTTPS (certificates from `cert`, hot-reloaded) until
/// `shutdown`, then drains for at most `limits.drain`.
pub async fn serve_tls(
    addr: SocketAddr,
    app: Router,
    cert: Arc<tls::ReloadingCert>,
    limits: HttpLimits,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let config = axum_server::tls_rustls::RustlsConfig::from_config(cert.server_config());
    let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(config)
        .handshake_timeout(limits.header_read_timeout);
    let listener = bind_std(addr)?;
    let server = axum_server::from_tcp(listener)
        .map_err(|source| ServeError::Bind { addr, source })?
        .acceptor(acceptor);
    let server = http1_bounded(server, limits);
    info!(addr = %addr, "webhook listening (HTTPS)");
    drain_on(server, shutdown, limits.drain)
        .serve(with_request_timeout(app, limits.request_timeout).into_make_service())
        .await
        .map_err(|source| ServeError::Serve { addr, source })
}

/// `serve`: builds the shared resolver and cache, starts the endpoint and
/// the credential watcher, and shuts everything down on SIGTERM.
pub async fn run(args: crate::cli::ServeArgs) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let settings = args.registry.resolver_settings();
    let resolver = Arc::new(crate::registry::Resolver::with_observer(
        &settings,
        Some(metrics.clone()),
    )?);
    let cache = CachedResolver::new(resolver.clone(), args.cache.settings(), metrics.clone());
    let readiness = Arc::new(Readiness::default());
    readiness.set("resolver", Ok(()));
    let mut admitter = crate::admission::Admitter::new(
        cache.clone(),
        crate::admission::AdmissionSettings {
            namespace: args.registry.pod_namespace.clone(),
            function_label: args.registration.function_pod_label.clone(),
            pull_secret: args.registry.registry_auth_secret_name.clone(),
            failure_mode: args.webhook.failure_mode,
            pin_function_image: args.webhook.pin_function_image,
            default_timeout: args.webhook.admission_timeout,
        },
    )
    .with_metrics(metrics.clone());
    let mirror = (settings.private_registries && args.webhook.mirror_secret).then(|| {
        let status = Arc::new(crate::secrets::MirrorStatus::default());
        admitter = admitter.clone().with_mirror(status.clone());
        status
    });
    let cert = match (&args.webhook.tls_cert_file, &args.webhook.tls_key_file) {
        (Some(c), Some(k)) => Some(tls::ReloadingCert::load(c.clone(), k.clone())?),
        (None, None) => None,
        _ => anyhow::bail!("--tls-cert-file and --tls-key-file go together"),
    };
    let state = Arc::new(AppState {
        admitter,
        cache: cache.clone(),
        metrics,
        readiness,
        max_batch: args.server.max_batch,
        allowed_registries: args
            .server
            .resolver_allowed_registries
            .iter()
            .map(|h| crate::registry::reference::normalize_host(h))
            .collect(),
    });
    let limits = args.server.limits();
    let shutdown = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    if settings.private_registries {
        tasks.spawn(watch_credentials(
            settings.docker_config_path.clone(),
            resolver.credentials().clone(),
            cache,
            shutdown.clone(),
        ));
    }
    if let Some(cert) = &cert {
        cert.observe(state.metrics.clone());
        tasks.spawn(cert.clone().watch(shutdown.clone()));
        let tokens = match &args.webhook.resolver_token_file {
            Some(path) => Some(auth::Authenticator::Tokens(auth::Tokens::load(path)?)),
            None if args.webhook.resolver_token_review => {
                anyhow::ensure!(
                    !args.webhook.resolver_allowed_subjects.is_empty(),
                    "--resolver-token-review needs --resolver-allowed-subjects: without it every identity in the cluster could use the resolver"
                );
                let client = crate::registration::kube_client()
                    .await
                    .map_err(|e| anyhow::anyhow!("--resolver-token-review: {e}"))?;
                Some(auth::Authenticator::TokenReview(Box::new(
                    auth::TokenReviewer::new(
                        client,
                        args.webhook.resolver_allowed_subjects.clone(),
                    ),
                )))
            }
            None => None,
        };
        let webhook = serve_tls(
            args.webhook.listen,
            webhook_router(state.clone(), tokens),
            cert.clone(),
            limits,
            shutdown.clone(),
        );
        let stop = shutdown.clone();
        tasks.spawn(async move {
            if let Err(e) = webhook.await {
                tracing::error!(error = %e, "webhook listener failed; shutting down");
                stop.cancel();
            }
        });
    } else {
        info!("no --tls-cert-file: the admission webhook listener is off");
    }
    if let Some(status) = mirror {
        state
            .readiness
            .set("pull-secret", Err("not synced yet".into()));
        let mirror_settings = crate::secrets::MirrorSettings {
            source: settings.docker_config_path.clone(),
            name: args.registry.registry_auth_secret_name.clone(),
            namespace: args.registry.pod_namespace.clone(),
            resync: args.webhook.secret_resync_interval,
        };
        tasks.spawn(mirror_with_client(
            mirror_settings,
            status,
            state.metrics.clone(),
            state.readiness.clone(),
            shutdown.clone(),
        ));
    }
    if args.register_webhook {
        let config = crate::registration::build(&args.registration, &args.registry.pod_namespace)?;
        state
            .readiness
            .set("webhook-registration", Err("not registered yet".into()));
        tasks.spawn(register_until_done(
            config,
            state.readiness.clone(),
            shutdown.clone(),
        ));
    }
    let readiness = state.readiness.clone();
    let server = tokio::spawn(serve_loopback(
        args.server.resolver_listen,
        router(state),
        limits,
        shutdown.clone(),
    ));
    tokio::pin!(server);
    tokio::select! {
        () = shutdown_signal() => {
            // Not ready at once, so the endpoints drop this pod; meanwhile
            // both listeners go on serving, closing each connection after
            // its answer so clients re-dial a replica that stays.
            readiness.begin_shutdown();
            info!(
                delay_ms = limits.delay.as_millis() as u64,
                drain_ms = limits.drain.as_millis() as u64,
                "shutdown signal received: /readyz answers 503; serving on until the delay ends, then draining"
            );
            tokio::select! {
                () = tokio::time::sleep(limits.delay) => {}
                () = shutdown.cancelled() => {}
            }
            info!("shutting down: no new connections; draining in-flight requests");
        }
        () = shutdown.cancelled() => warn!("shutting down after a listener failed"),
        result = &mut server => {
            shutdown.cancel();
            return match result {
                Ok(r) => r.map_err(Into::into),
                Err(join) => Err(anyhow::anyhow!("server task failed: {join}")),
            };
        }
    }
    shutdown.cancel();
    match tokio::time::timeout(args.server.shutdown_timeout, &mut server).await {
        Ok(Ok(result)) => result?,
        Ok(Err(join)) => return Err(anyhow::anyhow!("server task failed: {join}")),
        Err(_) => warn!(
            timeout_secs = args.server.shutdown_timeout.as_secs(),
            "in-flight requests did not finish in time; exiting anyway"
        ),
    }
    // Let the webhook listener drain too (it stops on the same token).
    let _ = tokio::time::timeout(args.server.shutdown_timeout, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.shutdown().await;
    info!("stopped");
    Ok(())
}

/// Applies the webhook configuration, retrying with backoff (the API server
/// may not be reachable yet); readiness reports it until it succeeds.
async fn register_until_done(
    config: k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) {
    let mut delay = std::time::Duration::from_millis(500);
    loop {
        let result = match crate::registration::kube_client().await {
            Ok(client) => crate::registration::apply(client, &config)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                info!(
                    name = config.metadata.name.as_deref().unwrap_or_default(),
                    "webhook registered"
                );
                readiness.set("webhook-registration", Ok(()));
                return;
            }
            Err(e) => {
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "webhook registration failed");
                readiness.set("webhook-registration", Err(e));
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(std::time::Duration::from_secs(30));
    }
}

/// Runs the secret mirror once a Kubernetes client can be built (retrying
/// until then, with the reason in /readyz).
async fn mirror_with_client(
    settings: crate::secrets::MirrorSettings,
    status: Arc<crate::secrets::MirrorStatus>,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) {
    let client = loop {
        match crate::registration::kube_client().await {
            Ok(client) => break client,
            Err(reason) => {
                warn!(error = %reason, "secret mirror waiting for a Kubernetes client");
                readiness.set("pull-secret", Err(reason));
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
                }
            }
        }
    };
    crate::secrets::run(client, settings, status, metrics, Some(readiness), shutdown).await;
}
