//! Serving a router: plain HTTP on loopback or HTTPS with a reloading
//! certificate, HTTP/1.1 only, every phase of a connection under a time
//! limit, and a graceful drain when told to stop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::IntoResponse;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::api::ApiError;
use super::tls;

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
/// Resolutions it started keep running and fill the cache. The routes
/// apply it inside their request counting, so 408s are counted too.
pub fn with_request_timeout(app: Router, limit: Duration) -> Router {
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

/// A bound listening socket; bind first, then serve, so that the address
/// (port 0 included) is known before anything is served on it.
#[derive(Debug)]
pub struct Listener {
    socket: std::net::TcpListener,
    addr: SocketAddr,
}

impl Listener {
    pub fn bind(addr: SocketAddr) -> Result<Self, ServeError> {
        let socket = std::net::TcpListener::bind(addr)
            .map_err(|source| ServeError::Bind { addr, source })?;
        let addr = socket.local_addr().unwrap_or(addr);
        Ok(Self { socket, addr })
    }

    /// The address it is bound to (the port chosen, when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Serves `app` in plain HTTP on a loopback `listener` until `shutdown`
/// fires, then lets in-flight requests finish (for at most `limits.drain`).
pub async fn serve_loopback(
    listener: Listener,
    app: Router,
    limits: HttpLimits,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let addr = listener.addr;
    if !addr.ip().is_loopback() {
        return Err(ServeError::NotLoopback(addr));
    }
    let server = axum_server::from_tcp(listener.socket)
        .map_err(|source| ServeError::Bind { addr, source })?;
    let server = http1_bounded(server, limits);
    info!(addr = %addr, "resolver endpoint listening (plain HTTP, loopback)");
    drain_on(server, shutdown, limits.drain)
        .serve(app.into_make_service())
        .await
        .map_err(|source| ServeError::Serve { addr, source })
}

/// Serves `app` over HTTPS (certificates from `cert`, hot-reloaded) on
/// `listener` until `shutdown`, then drains for at most `limits.drain`.
pub async fn serve_tls(
    listener: Listener,
    app: Router,
    cert: Arc<tls::ReloadingCert>,
    limits: HttpLimits,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let addr = listener.addr;
    let config = axum_server::tls_rustls::RustlsConfig::from_config(cert.server_config());
    let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(config)
        .handshake_timeout(limits.header_read_timeout);
    let server = axum_server::from_tcp(listener.socket)
        .map_err(|source| ServeError::Bind { addr, source })?
        .acceptor(acceptor);
    let server = http1_bounded(server, limits);
    info!(addr = %addr, "webhook listening (HTTPS)");
    drain_on(server, shutdown, limits.drain)
        .serve(app.into_make_service())
        .await
        .map_err(|source| ServeError::Serve { addr, source })
}
