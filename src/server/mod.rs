//! The HTTP surfaces: the admission webhook and the resolver endpoint, their
//! routes, caller authentication, serving certificates and listeners. They
//! take plain settings and know nothing of the command line.

mod api;
pub mod auth;
mod listener;
mod routes;
mod state;
pub mod tls;

pub use api::{ApiError, error_json, status_of};
pub use listener::{HttpLimits, Listener, ServeError, serve_loopback, serve_tls};
pub use routes::{router, webhook_router};
pub use state::AppState;
