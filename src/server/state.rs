//! What every handler can reach.

use std::sync::Arc;

use crate::admission::Admitter;
use crate::cache::CachedResolver;
use crate::health::Readiness;
use crate::metrics::Metrics;

/// The shared state of both listeners' routes.
#[derive(Debug)]
pub struct AppState {
    pub admitter: Admitter,
    pub cache: CachedResolver,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    pub max_batch: usize,
    /// Normalized registry hosts `/v1/resolve` may ask; empty: any.
    pub allowed_registries: Vec<String>,
    /// A request's body upload and answer must fit this, else 408.
    pub request_timeout: std::time::Duration,
}
