//! The routes of both listeners: `/mutate` (the admission webhook),
//! `/v1/resolve` (the resolver endpoint), `/healthz`, `/readyz` and
//! `/metrics`, with the middleware that counts every request.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::api::{self, ApiError};
use super::auth;
use super::state::AppState;

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
