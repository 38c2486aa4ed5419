//! An HTTP proxy in front of a real registry that counts requests and can
//! inject faults (status codes, delays), so tests can assert exactly how many
//! round trips a resolve costs and how failures are handled.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, StatusCode};
use axum::response::Response;

/// A fault applied to matching requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    None,
    /// Answer with this status (and `Retry-After` when given) without
    /// reaching the registry.
    Status {
        code: u16,
        retry_after: Option<u64>,
    },
    /// Wait this long before forwarding.
    Delay(Duration),
    /// Serve this body instead of the registry's (a lying registry), keeping
    /// the registry's headers.
    ReplaceBody(Vec<u8>),
    /// Answer 307 to the same path on this base URL (as registries redirect
    /// blob downloads to a storage host).
    Redirect(String),
}

/// What a request was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Manifest,
    Blob,
    Other,
}

#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: String,
    pub kind: Kind,
    pub authorization: Option<String>,
}

#[derive(Debug)]
struct Shared {
    upstream: String,
    client: reqwest::Client,
    seen: Mutex<Vec<Seen>>,
    fault: Mutex<(Fault, Option<Kind>)>,
    /// Added before every request of the fault's kind, whatever the fault.
    delay: Mutex<Duration>,
    in_flight: AtomicUsize,
    peak_in_flight: AtomicUsize,
    /// Added to every response (e.g. a registry's rate-limit headers).
    extra_headers: Mutex<Vec<(String, String)>>,
}

/// Handle to a running proxy.
#[derive(Debug, Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
    pub port: u16,
    /// `127.0.0.1:PORT`: use it as the registry host (plain HTTP).
    pub host: String,
}

fn kind_of(path: &str) -> Kind {
    if path.contains("/manifests/") {
        Kind::Manifest
    } else if path.contains("/blobs/") {
        Kind::Blob
    } else {
        Kind::Other
    }
}

impl Proxy {
    /// Proxies to `upstream` (e.g. `http://127.0.0.1:5000`).
    pub async fn start(upstream: &str) -> Self {
        let shared = Arc::new(Shared {
            upstream: upstream.trim_end_matches('/').to_string(),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("proxy client"),
            seen: Mutex::new(Vec::new()),
            fault: Mutex::new((Fault::None, None)),
            delay: Mutex::new(Duration::ZERO),
            in_flight: AtomicUsize::new(0),
            peak_in_flight: AtomicUsize::new(0),
            extra_headers: Mutex::new(Vec::new()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let app = Router::new().fallback(forward).with_state(shared.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            shared,
            port,
            host: format!("127.0.0.1:{port}"),
        }
    }

    /// Applies `fault` to requests of `only` kind (all when `None`).
    pub fn set_fault(&self, fault: Fault, only: Option<Kind>) {
        *self.shared.fault.lock().expect("fault") = (fault, only);
    }

    /// Delays matching requests (on top of any fault): makes a slow registry.
    pub fn set_delay(&self, delay: Duration) {
        *self.shared.delay.lock().expect("delay") = delay;
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().expect("seen").clone()
    }

    pub fn reset(&self) {
        self.shared.seen.lock().expect("seen").clear();
        self.shared.peak_in_flight.store(0, Ordering::SeqCst);
    }

    /// Adds `name: value` to every response from now on.
    pub fn add_response_header(&self, name: &str, value: &str) {
        self.shared
            .extra_headers
            .lock()
            .expect("headers")
            .push((name.to_string(), value.to_string()));
    }

    /// The most requests that were inside the proxy at once (since reset).
    pub fn peak_in_flight(&self) -> usize {
        self.shared.peak_in_flight.load(Ordering::SeqCst)
    }

    pub fn count(&self, method: &str, kind: Kind) -> usize {
        self.seen()
            .iter()
            .filter(|s| s.method == method && s.kind == kind)
            .count()
    }

    pub fn total(&self) -> usize {
        self.seen().len()
    }
}

/// Counts a request as in flight until dropped.
struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    fn enter(shared: &'a Shared) -> Self {
        let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.peak_in_flight.fetch_max(now, Ordering::SeqCst);
        Self(shared)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn forward(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let _in_flight = InFlight::enter(&shared);
    let method = request.method().clone();
    let path_and_query = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let kind = kind_of(request.uri().path());
    shared.seen.lock().expect("seen").push(Seen {
        method: method.to_string(),
        path: request.uri().path().to_string(),
        query: request.uri().query().unwrap_or_default().to_string(),
        kind,
        authorization: request
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    });
    let (fault, only) = shared.fault.lock().expect("fault").clone();
    let applies = only.is_none_or(|k| k == kind);
    let delay = *shared.delay.lock().expect("delay");
    if applies && !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut replace_body = None;
    if applies {
        match fault {
            Fault::None => {}
            Fault::Status { code, retry_after } => {
                let mut resp = Response::builder().status(code);
                if let Some(secs) = retry_after {
                    resp = resp.header("Retry-After", secs.to_string());
                }
                return resp
                    .header("Content-Type", "application/json")
                    .body(Body::from(
                        r#"{"errors":[{"code":"UNAVAILABLE","message":"injected"}]}"#,
                    ))
                    .expect("fault response");
            }
            Fault::Delay(d) => tokio::time::sleep(d).await,
            Fault::ReplaceBody(body) => replace_body = Some(body),
            Fault::Redirect(base) => {
                return Response::builder()
                    .status(StatusCode::TEMPORARY_REDIRECT)
                    .header("Location", format!("{base}{path_and_query}"))
                    .body(Body::empty())
                    .expect("redirect response");
            }
        }
    }
    let headers: HeaderMap = request
        .headers()
        .iter()
        .filter(|(k, _)| *k != "host" && *k != "content-length")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let body = match axum::body::to_bytes(request.into_body(), 64 * 1024 * 1024).await {
        Ok(b) => b,
        Err(_) => return status(StatusCode::BAD_REQUEST),
    };
    let upstream = shared
        .client
        .request(method, format!("{}{path_and_query}", shared.upstream))
        .headers(headers)
        .body(body)
        .send()
        .await;
    let upstream = match upstream {
        Ok(r) => r,
        Err(_) => return status(StatusCode::BAD_GATEWAY),
    };
    let mut resp = Response::builder().status(upstream.status().as_u16());
    for (k, v) in upstream.headers() {
        if k == "transfer-encoding" || k == "connection" {
            continue;
        }
        if replace_body.is_some() && k == "content-length" {
            continue;
        }
        resp = resp.header(
            HeaderName::from_bytes(k.as_ref()).expect("header"),
            v.clone(),
        );
    }
    for (k, v) in shared.extra_headers.lock().expect("headers").iter() {
        resp = resp.header(k.as_str(), v.as_str());
    }
    let bytes = match replace_body {
        Some(b) => b.into(),
        None => upstream.bytes().await.unwrap_or_default(),
    };
    resp.body(Body::from(bytes)).expect("proxied response")
}

fn status(code: StatusCode) -> Response {
    Response::builder()
        .status(code)
        .body(Body::empty())
        .expect("status response")
}
