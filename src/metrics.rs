//! Prometheus metrics. Labels are small fixed sets (route, outcome, request
//! kind, status code, registry host); never a credential, token, image name or
//! other unbounded value.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::registry::client::{RequestKind, RequestObserver};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegistryLabels {
    registry: String,
    kind: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HostLabel {
    registry: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    registry: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub route: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 50 µs … ~0.8 s: cache hits at the low end, registry round trips above.
    Histogram::new(exponential_buckets(0.00005, 2.0, 15))
}

/// How many registry hosts seen at run time get label values of their own;
/// the rest share [`OTHER_REGISTRY`], so that callers naming arbitrary hosts
/// cannot grow the metrics without bound.
pub const MAX_REGISTRY_LABELS: usize = 32;
/// The label value of every registry host past the limit.
pub const OTHER_REGISTRY: &str = "other";

/// Registry hosts as label values: the configured ones always, then the
/// first [`MAX_REGISTRY_LABELS`] others seen.
#[derive(Debug, Default)]
struct RegistryNames {
    configured: std::sync::RwLock<std::collections::HashSet<String>>,
    seen: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl RegistryNames {
    fn label(&self, host: &str) -> String {
        let configured = self
            .configured
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if configured.contains(host) {
            return host.to_string();
        }
        drop(configured);
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.contains(host) || seen.len() < MAX_REGISTRY_LABELS {
            seen.insert(host.to_string());
            host.to_string()
        } else {
            OTHER_REGISTRY.to_string()
        }
    }
}

/// All metrics of the process.
pub struct Metrics {
    registry_names: RegistryNames,
    registry: Registry,
    lookups: Family<ResultLabel, Counter>,
    revalidations: Family<ResultLabel, Counter>,
    pub cache_evictions: Counter,
    pub cache_entries: Gauge,
    registry_requests: Family<RegistryLabels, Counter>,
    registry_latency: HistogramFamily<KindLabels>,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_latency: HistogramFamily<RouteLabels>,
    admission: Family<ResultLabel, Counter>,
    admission_unpinned: Family<ReasonLabel, Counter>,
    admission_entrypoints_replaced: Counter,
    token_reviews: Family<ResultLabel, Counter>,
    handler_panics: Family<RouteLabels, Counter>,
    prewarm: Family<ResultLabel, Counter>,
    log_lines_dropped: Counter,
    /// The dropped-lines count the last scrape saw.
    log_lines_dropped_seen: std::sync::atomic::AtomicU64,
    secret_syncs: Family<ResultLabel, Counter>,
    secret_last_success: Gauge<f64, std::sync::atomic::AtomicU64>,
    secret_propagation: Histogram,
    /// Unix time at which the webhook's serving certificate expires.
    pub cert_expiry: Gauge,
    serving_certificate_writes: Family<ReasonLabel, Counter>,
    /// HTTP requests being answered right now, both listeners.
    in_flight: Gauge,
    ratelimit_limit: Family<HostLabel, Gauge>,
    ratelimit_remaining: Family<HostLabel, Gauge>,
    // Handles for the hot path: no label allocation per cache hit.
    hit: Counter,
    miss: Counter,
    stale: Counter,
    negative: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("fn_image_resolver");
        let lookups = Family::<ResultLabel, Counter>::default();
        registry.register(
            "cache_lookups",
            "Resolver cache lookups by result (hit, miss, stale, negative)",
            lookups.clone(),
        );
        let revalidations = Family::<ResultLabel, Counter>::default();
        registry.register(
            "cache_revalidations",
            "Background revalidations of stale tag answers by result (refreshed, gone, failed)",
            revalidations.clone(),
        );
        let cache_evictions = Counter::default();
        registry.register(
            "cache_evictions",
            "Entries evicted to stay within the cache capacity",
            cache_evictions.clone(),
        );
        let cache_entries = Gauge::default();
        registry.register(
            "cache_entries",
            "Entries in the resolver cache",
            cache_entries.clone(),
        );
        let registry_requests = Family::<RegistryLabels, Counter>::default();
        registry.register(
            "registry_requests",
            "HTTP requests to registries and token servers by registry, kind and status",
            registry_requests.clone(),
        );
        let registry_latency: HistogramFamily<KindLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "registry_request_duration_seconds",
            "Registry request latency by registry and kind",
            registry_latency.clone(),
        );
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests served by route and outcome",
            http_requests.clone(),
        );
        let http_latency: HistogramFamily<RouteLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "http_request_duration_seconds",
            "Time to answer HTTP requests by route",
            http_latency.clone(),
        );
        let admission = Family::<ResultLabel, Counter>::default();
        registry.register(
            "admission_reviews",
            "AdmissionReviews answered by result (patched, unchanged, denied, failed-open, invalid)",
            admission.clone(),
        );
        let admission_unpinned = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "admission_containers_unpinned",
            "Containers admitted with their image as written because it could not be resolved, by reason (an error kind, or deadline)",
            admission_unpinned.clone(),
        );
        let log_lines_dropped = Counter::default();
        registry.register(
            "log_lines_dropped",
            "Log lines dropped because the log sink could not keep up (requests never wait for it)",
            log_lines_dropped.clone(),
        );
        let prewarm = Family::<ResultLabel, Counter>::default();
        registry.register(
            "prewarm_images",
            "Images resolved at start-up to warm the cache, by result (cached, failed)",
            prewarm.clone(),
        );
        let handler_panics = Family::<RouteLabels, Counter>::default();
        registry.register(
            "http_handler_panics",
            "Requests whose handler panicked (answered 500, or per the failure mode on /mutate); each is a bug",
            handler_panics.clone(),
        );
        let token_reviews = Family::<ResultLabel, Counter>::default();
        registry.register(
            "token_reviews",
            "Callers of the HTTPS resolver checked with a TokenReview, by result (allowed, forbidden, unauthenticated, busy, error); cached verdicts are not counted",
            token_reviews.clone(),
        );
        let admission_entrypoints_replaced = Counter::default();
        registry.register(
            "admission_entrypoints_replaced",
            "Function containers whose entrypoint after \"--\" did not match the pinned image and was replaced",
            admission_entrypoints_replaced.clone(),
        );
        let secret_syncs = Family::<ResultLabel, Counter>::default();
        registry.register(
            "secret_syncs",
            "Pull-secret mirror syncs by result (created, updated, unchanged, error, invalid-source)",
            secret_syncs.clone(),
        );
        let secret_last_success = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "secret_last_success_timestamp_seconds",
            "Unix time of the last successful pull-secret sync",
            secret_last_success.clone(),
        );
        let secret_propagation = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register(
            "secret_propagation_seconds",
            "Time from a Docker config change on disk to the pull secret updated",
            secret_propagation.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "http_requests_in_flight",
            "HTTP requests being answered now (webhook and resolver listeners)",
            in_flight.clone(),
        );
        let cert_expiry = Gauge::default();
        registry.register(
            "tls_certificate_expiry_timestamp_seconds",
            "Unix time at which the webhook's serving certificate expires",
            cert_expiry.clone(),
        );
        let serving_certificate_writes = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "serving_certificate_writes",
            "Writes of the managed serving-certificate Secret by reason (created, issued, renewed, ca-new, ca-rollover, ca-rollover-done, ca-retired)",
            serving_certificate_writes.clone(),
        );
        let ratelimit_limit = Family::<HostLabel, Gauge>::default();
        registry.register(
            "registry_ratelimit_limit",
            "Pull limit a registry announced in its last RateLimit-Limit header (Docker Hub style)",
            ratelimit_limit.clone(),
        );
        let ratelimit_remaining = Family::<HostLabel, Gauge>::default();
        registry.register(
            "registry_ratelimit_remaining",
            "Pulls left according to a registry's last RateLimit-Remaining header",
            ratelimit_remaining.clone(),
        );
        let handle = |result: &str| {
            lookups.get_or_create_owned(&ResultLabel {
                result: result.to_string(),
            })
        };
        Arc::new(Self {
            registry_names: RegistryNames::default(),
            hit: handle("hit"),
            miss: handle("miss"),
            stale: handle("stale"),
            negative: handle("negative"),
            registry,
            lookups,
            revalidations,
            cache_evictions,
            cache_entries,
            registry_requests,
            registry_latency,
            http_requests,
            http_latency,
            admission,
            admission_unpinned,
            admission_entrypoints_replaced,
            token_reviews,
            handler_panics,
            prewarm,
            log_lines_dropped,
            log_lines_dropped_seen: std::sync::atomic::AtomicU64::new(0),
            secret_syncs,
            secret_last_success,
            secret_propagation,
            cert_expiry,
            serving_certificate_writes,
            in_flight,
            ratelimit_limit,
            ratelimit_remaining,
        })
    }

    pub fn cache_lookup(&self, result: &'static str) {
        match result {
            "hit" => self.hit.inc(),
            "miss" => self.miss.inc(),
            "stale" => self.stale.inc(),
            "negative" => self.negative.inc(),
            other => self
                .lookups
                .get_or_create(&ResultLabel {
                    result: other.to_string(),
                })
                .inc(),
        };
    }

    pub fn cache_revalidation(&self, result: &'static str) {
        self.revalidations
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
    }

    pub fn secret_sync(&self, result: &'static str) {
        self.secret_syncs
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
    }

    /// The managed serving-certificate Secret was written, for `reason`.
    pub fn serving_certificate_write(&self, reason: &'static str) {
        self.serving_certificate_writes
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub fn secret_synced_now(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        self.secret_last_success.set(now);
    }

    pub fn secret_propagation(&self, elapsed: Duration) {
        self.secret_propagation.observe(elapsed.as_secs_f64());
    }

    pub fn admission_review(&self, result: &'static str) {
        self.admission
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
    }

    /// A container admitted unpinned; `reason` is one of a fixed set.
    pub fn admission_unpinned(&self, reason: &'static str) {
        self.admission_unpinned
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// An image resolved (or not) at start-up; `result` is cached or failed.
    pub fn prewarm(&self, result: &'static str) {
        self.prewarm
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
    }

    /// A handler panicked while answering `route` (a matched route pattern).
    pub fn handler_panic(&self, route: &str) {
        self.handler_panics
            .get_or_create(&RouteLabels {
                route: route.to_string(),
            })
            .inc();
    }

    pub fn token_review(&self, result: &'static str) {
        self.token_reviews
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
    }

    /// `count` function entrypoints replaced in one review.
    pub fn admission_entrypoints_replaced(&self, count: usize) {
        self.admission_entrypoints_replaced
            .inc_by(u64::try_from(count).unwrap_or(u64::MAX));
    }

    /// Counts a request as in flight until the returned guard drops.
    pub fn request_started(&self) -> InFlight<'_> {
        self.in_flight.inc();
        InFlight(&self.in_flight)
    }

    /// Records one served HTTP request.
    pub fn http_request(&self, route: &str, outcome: &str, elapsed: Duration) {
        self.http_requests
            .get_or_create(&HttpLabels {
                route: route.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
        self.http_latency
            .get_or_create(&RouteLabels {
                route: route.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Registry hosts that always get label values of their own: those of
    /// the Docker config, the default image prefix and the resolver's
    /// allowlist (normalized).
    pub fn configure_registries<I: IntoIterator<Item = String>>(&self, hosts: I) {
        self.registry_names
            .configured
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(hosts);
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let dropped = crate::telemetry::dropped_log_lines();
        let seen = self
            .log_lines_dropped_seen
            .swap(dropped, std::sync::atomic::Ordering::Relaxed);
        self.log_lines_dropped.inc_by(dropped.saturating_sub(seen));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl RequestObserver for Metrics {
    fn observe(&self, registry: &str, kind: RequestKind, status: Option<u16>, elapsed: Duration) {
        let registry = self.registry_names.label(registry);
        self.registry_requests
            .get_or_create(&RegistryLabels {
                registry: registry.clone(),
                kind: kind.as_str().to_string(),
                status: status.map_or_else(|| "error".to_string(), |s| s.to_string()),
            })
            .inc();
        self.registry_latency
            .get_or_create(&KindLabels {
                registry,
                kind: kind.as_str().to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    fn rate_limit(&self, registry: &str, limit: Option<u64>, remaining: Option<u64>) {
        let label = HostLabel {
            registry: self.registry_names.label(registry),
        };
        let as_gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        if let Some(limit) = limit {
            self.ratelimit_limit
                .get_or_create(&label)
                .set(as_gauge(limit));
        }
        if let Some(remaining) = remaining {
            self.ratelimit_remaining
                .get_or_create(&label)
                .set(as_gauge(remaining));
        }
    }
}

/// Counts one request out of `http_requests_in_flight` when dropped.
#[derive(Debug)]
pub struct InFlight<'a>(&'a Gauge);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry_label_values(text: &str) -> std::collections::BTreeSet<String> {
        text.lines()
            .filter(|l| l.starts_with("fn_image_resolver_registry_"))
            .filter_map(|l| l.split("registry=\"").nth(1))
            .filter_map(|v| v.split('"').next())
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn three_hundred_hosts_make_at_most_thirty_two_labels_plus_other() {
        let metrics = Metrics::new();
        metrics.configure_registries([
            "ghcr.io".to_string(),
            "registry.example.com:5000".to_string(),
        ]);
        for i in 0..300 {
            let host = format!("h{i}.example.net");
            metrics.observe(
                &host,
                RequestKind::Manifest,
                Some(404),
                Duration::from_millis(1),
            );
            metrics.rate_limit(&host, Some(100), Some(i));
        }
        // Configured hosts keep their own values, however late they come.
        metrics.observe(
            "ghcr.io",
            RequestKind::Manifest,
            Some(200),
            Duration::from_millis(1),
        );
        metrics.observe(
            "registry.example.com:5000",
            RequestKind::Blob,
            None,
            Duration::from_millis(1),
        );
        let values = registry_label_values(&metrics.encode());
        assert!(values.contains("ghcr.io") && values.contains("registry.example.com:5000"));
        assert!(values.contains(OTHER_REGISTRY));
        assert!(values.contains("h0.example.net") && !values.contains("h299.example.net"));
        assert_eq!(values.len(), MAX_REGISTRY_LABELS + 3, "{values:?}");
    }
}
