//! The long-running process: the resolver endpoint, health, readiness and
//! metrics, the credential watcher, and graceful shutdown.

mod api;
mod watch;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

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

pub use api::status_of;

/// Readiness checks by name; the process is ready when all are.
#[derive(Debug, Default)]
pub struct Readiness {
    checks: Mutex<BTreeMap<&'static str, Result<(), String>>>,
}

impl Readiness {
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
    pub cache: CachedResolver,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    pub max_batch: usize,
}

/// Largest request body accepted (a batch of image references).
const MAX_BODY_BYTES: usize = 256 * 1024;

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
    state.cache.run_pending_tasks().await;
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
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({"error": {"kind": "bad-request", "message": "no such route"}})),
    )
        .into_response()
}

/// Counts every request by matched route (bounded) and status.
async fn observe(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let started = Instant::now();
    let response = next.run(request).await;
    state
        .metrics
        .http_request(&route, response.status().as_str(), started.elapsed());
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

/// Serves `app` in plain HTTP on a loopback `addr` until `shutdown` fires,
/// then lets in-flight requests finish.
pub async fn serve_loopback(
    addr: SocketAddr,
    app: Router,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    if !addr.ip().is_loopback() {
        return Err(ServeError::NotLoopback(addr));
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let local = listener.local_addr().unwrap_or(addr);
    info!(addr = %local, "resolver endpoint listening (plain HTTP, loopback)");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .map_err(|source| ServeError::Serve { addr, source })
}

pub use watch::watch_credentials;

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
    let state = Arc::new(AppState {
        cache: cache.clone(),
        metrics,
        readiness,
        max_batch: args.server.max_batch,
    });
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
    let server = tokio::spawn(serve_loopback(
        args.server.resolver_listen,
        router(state),
        shutdown.clone(),
    ));
    tokio::pin!(server);
    tokio::select! {
        () = shutdown_signal() => info!("shutting down: draining in-flight requests"),
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
    tasks.shutdown().await;
    info!("stopped");
    Ok(())
}
