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
use futures_util::FutureExt as _;
use std::panic::AssertUnwindSafe;

use super::api::{self, ApiError};
use super::auth;
use super::listener::with_request_timeout;
use super::state::AppState;
use crate::metrics::Metrics;

/// Largest request body accepted (a batch of image references).
const MAX_BODY_BYTES: usize = 256 * 1024;

/// Largest AdmissionReview accepted: the API server caps objects near 1.5 MiB
/// and a review can carry two of them.
const MAX_REVIEW_BYTES: usize = 4 * 1024 * 1024;

/// The webhook listener's routes: `/mutate` with health, readiness and
/// metrics, and `/v1/resolve` for authenticated callers when `auth` is set.
pub fn webhook_router(state: Arc<AppState>, auth: Option<auth::Authenticator>) -> Router {
    let mut router = Router::new().route(
        "/mutate",
        axum::routing::post(mutate).layer(DefaultBodyLimit::max(MAX_REVIEW_BYTES)),
    );
    if let Some(tokens) = auth {
        let resolver = Router::new()
            .route(
                "/v1/resolve",
                get(api::resolve_one).post(api::resolve_batch),
            )
            .route_layer(middleware::from_fn_with_state(tokens, auth::require_token))
            // The resolver's own limit, not the review's 4 MiB.
            .layer(DefaultBodyLimit::max(MAX_BODY_BYTES));
        router = router.merge(resolver);
    }
    with_common_routes(router, state)
}

/// What both listeners serve besides their own routes (health, readiness,
/// metrics, a JSON 404), and the layers every request passes: a counted
/// 500 for a panic, the request timeout, and the request metrics.
fn with_common_routes(router: Router<Arc<AppState>>, state: Arc<AppState>) -> Router {
    let router = router
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            state.metrics.clone(),
            catch_panics,
        ))
        .with_state(state.clone());
    with_request_timeout(router, state.request_timeout)
        .layer(middleware::from_fn_with_state(state, observe))
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
    // A panic while reading the review (its uid unknown) is a 500, from the
    // catch_panics layer; once the uid is known, the answer follows the
    // failure mode, since the API server reads no body but a 200 review's.
    let decoded = match state.admitter.decode(&body) {
        Ok(decoded) => decoded,
        Err(e) => {
            state.metrics.admission_review("invalid");
            return error(StatusCode::BAD_REQUEST, e.to_string());
        }
    };
    let uid = decoded.uid.clone();
    let review = AssertUnwindSafe(state.admitter.review_decoded(decoded, timeout))
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| {
            state.metrics.handler_panic("/mutate");
            tracing::error!(
                uid,
                panic = panic_message(&panic),
                "reviewing a pod panicked"
            );
            state.admitter.internal_failure(&uid)
        });
    state.metrics.admission_review(review.outcome);
    axum::Json(review).into_response()
}

/// What a panic said, when it said it with a string.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Turns a panic in any handler into an HTTP 500 (counted), never a
/// dropped connection.
pub(super) async fn catch_panics(
    State(metrics): State<Arc<Metrics>>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    match AssertUnwindSafe(next.run(request)).catch_unwind().await {
        Ok(response) => response,
        Err(panic) => {
            metrics.handler_panic(&route);
            tracing::error!(
                route,
                panic = panic_message(&panic),
                "a request handler panicked"
            );
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "an internal error occurred (logged and counted)",
            )
            .into_response()
        }
    }
}

/// The resolver API with health, readiness and metrics.
pub fn router(state: Arc<AppState>) -> Router {
    let router = Router::new()
        .route(
            "/v1/resolve",
            get(api::resolve_one).post(api::resolve_batch),
        )
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES));
    with_common_routes(router, state)
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

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt as _;

    async fn boom() -> &'static str {
        panic!("boom")
    }

    #[tokio::test]
    async fn a_panicking_handler_is_a_counted_500_not_a_dropped_connection() {
        let metrics = Metrics::new();
        let app = Router::new()
            .route("/boom", get(boom))
            .route("/fine", get(|| async { "fine" }))
            .layer(middleware::from_fn_with_state(
                metrics.clone(),
                catch_panics,
            ));
        let call = |path: &'static str| {
            let app = app.clone();
            async move {
                app.oneshot(
                    Request::get(path)
                        .body(axum::body::Body::empty())
                        .expect("request"),
                )
                .await
                .expect("an answer")
                .status()
            }
        };
        assert_eq!(call("/boom").await, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(call("/boom").await, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(call("/fine").await, StatusCode::OK);
        let text = metrics.encode();
        assert!(
            text.contains("fn_image_resolver_http_handler_panics_total{route=\"/boom\"} 2"),
            "{text}"
        );
    }
}
