//! `/v1/resolve`: the resolver over HTTP, for the function runner (sidecar)
//! and any other client.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::Instrument as _;

use super::state::AppState;
use crate::cache::CacheStatus;
use crate::registry::{ErrorKind, Platform, Resolution, ResolveError};

#[derive(Debug, Deserialize)]
pub struct ResolveQuery {
    image: Option<String>,
    platform: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    images: Vec<String>,
    #[serde(default)]
    platform: Option<String>,
}

/// A resolution plus where it came from.
#[derive(Debug, Serialize)]
pub struct Resolved {
    #[serde(flatten)]
    resolution: Resolution,
    cached: CacheStatus,
}

/// An error answer: `{"error": {"kind", "message"}}` with a fitting status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn bad_request(kind: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, kind, message)
    }

    /// The `error` object: `{"kind", "message"[, "retryAfterSeconds"]}`.
    fn body(&self) -> serde_json::Value {
        let mut body = json!({"kind": self.kind, "message": self.message});
        if let Some(secs) = self.retry_after {
            body["retryAfterSeconds"] = json!(secs);
        }
        body
    }
}

/// One image's failure as the CLI prints it and a batch answers it:
/// `{"image", "error": {"kind", "message"[, "retryAfterSeconds"]}}`.
pub fn error_json(image: &str, error: &ResolveError) -> serde_json::Value {
    json!({"image": image, "error": ApiError::from(error).body()})
}

/// HTTP status for a resolution failure: the client's fault (4xx), the
/// registry's (502), too slow (504), or the registry's rate limit (429).
pub fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::InvalidReference => StatusCode::BAD_REQUEST,
        ErrorKind::NotFound | ErrorKind::PlatformNotFound => StatusCode::NOT_FOUND,
        ErrorKind::UnsupportedImage => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::Unauthorized
        | ErrorKind::Tls
        | ErrorKind::Unreachable
        | ErrorKind::InvalidResponse
        | ErrorKind::RegistryError => StatusCode::BAD_GATEWAY,
    }
}

impl From<ResolveError> for ApiError {
    fn from(e: ResolveError) -> Self {
        Self::from(&e)
    }
}

impl From<&ResolveError> for ApiError {
    fn from(e: &ResolveError) -> Self {
        Self {
            status: status_of(e.kind()),
            kind: e.kind().as_str(),
            message: e.to_string(),
            retry_after: e.retry_after().map(|d| d.as_secs()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": self.body()});
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}

fn platform(raw: Option<&str>) -> Result<Option<Platform>, ApiError> {
    raw.filter(|p| !p.is_empty())
        .map(|p| p.parse::<Platform>())
        .transpose()
        .map_err(|e| ApiError::bad_request("invalid-platform", e.to_string()))
}

/// The registry allowlist (`--resolver-allowed-registries`): an empty list
/// allows every registry. Checked before the cache, so a refused image never
/// makes us contact its host.
fn check_allowed(state: &AppState, image: &str) -> Result<(), ApiError> {
    if state.allowed_registries.is_empty() {
        return Ok(());
    }
    let reference = state.cache.resolver().parse(image)?;
    if state
        .allowed_registries
        .iter()
        .any(|r| r == reference.registry())
    {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "registry-not-allowed",
        format!(
            "registry {} is not in this resolver's allowlist",
            reference.registry()
        ),
    ))
}

/// Runs a resolution as its own task, in the request's span; a task that
/// fails (a bug) is an internal error.
async fn spawn_resolution<T: Send + 'static>(
    resolution: impl std::future::Future<Output = Result<T, ResolveError>> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::spawn(resolution.in_current_span()).await {
        Ok(outcome) => outcome.map_err(ApiError::from),
        Err(join) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the resolution failed: {join}"),
        )),
    }
}

pub async fn resolve_one(
    State(state): State<Arc<AppState>>,
    query: Result<Query<ResolveQuery>, QueryRejection>,
) -> Result<Json<Resolved>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request("bad-request", e.body_text()))?;
    let image = query.image.filter(|i| !i.is_empty()).ok_or_else(|| {
        ApiError::bad_request("bad-request", "the query parameter `image` is required")
    })?;
    let platform = platform(query.platform.as_deref())?;
    check_allowed(&state, &image)?;
    // A task: if the client goes away or the request times out, the fetch
    // still finishes and fills the cache for the next caller.
    let cache = state.cache.clone();
    let (resolution, cached) =
        spawn_resolution(async move { cache.resolve(&image, platform.as_ref()).await }).await?;
    Ok(Json(Resolved { resolution, cached }))
}

pub async fn resolve_batch(
    State(state): State<Arc<AppState>>,
    body: Result<Json<BatchRequest>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(batch) = body.map_err(|e| ApiError {
        status: if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            StatusCode::PAYLOAD_TOO_LARGE
        } else if e.status() == StatusCode::UNSUPPORTED_MEDIA_TYPE {
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        } else {
            StatusCode::BAD_REQUEST
        },
        kind: "bad-request",
        message: format!(
            "the body must be JSON {{\"images\": [\"…\"], \"platform\": \"os/arch\"}}: {}",
            e.body_text()
        ),
        retry_after: None,
    })?;
    if batch.images.is_empty() {
        return Err(ApiError::bad_request("bad-request", "`images` is empty"));
    }
    if batch.images.len() > state.max_batch {
        return Err(ApiError::bad_request(
            "batch-too-large",
            format!(
                "{} images in one request; at most {} (--max-batch)",
                batch.images.len(),
                state.max_batch
            ),
        ));
    }
    let platform = platform(batch.platform.as_deref())?;
    // No more images in flight than could fetch at once: the rest would only
    // wait for a fetch permit, each holding its (kilobytes large) future;
    // with join_all a burst of batches of misses held hundreds of them.
    let in_flight = state.cache.resolver().max_concurrent_fetches();
    // Owned images: a stream of futures borrowing the batch is not `Send`
    // for every lifetime, as axum needs.
    let results: Vec<_> = futures_util::stream::iter(batch.images.into_iter().map(|image| {
        let state = state.clone();
        let platform = platform.clone();
        async move {
            if let Err(refused) = check_allowed(&state, &image) {
                return json!({"image": image, "error": refused.body()});
            }
            let cache = state.cache.clone();
            let resolving = image.clone();
            let resolution =
                spawn_resolution(async move { cache.resolve(&resolving, platform.as_ref()).await });
            match resolution.await {
                Ok((resolution, cached)) => {
                    serde_json::to_value(Resolved { resolution, cached }).unwrap_or_default()
                }
                Err(e) => json!({"image": image, "error": e.body()}),
            }
        }
    }))
    .buffered(in_flight)
    .collect()
    .await;
    Ok(Json(json!({"results": results})))
}
