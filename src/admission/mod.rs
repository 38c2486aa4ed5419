//! The mutating admission webhook: AdmissionReview in, JSON Patch out.

pub mod mutate;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tracing::{Instrument as _, debug, info, warn};

use self::mutate::{Failure, FailureKind, Options, Pod, PullSecret, Resolved};
use crate::cache::{CacheStatus, Cached, CachedResolver};
use crate::metrics::Metrics;
use crate::registry::ResolveError;
use crate::secrets::MirrorStatus;

/// What to do with a pod whose images cannot all be pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureMode {
    /// Deny only a pod that cannot be right; admit the containers that
    /// cannot be resolved as written, with a warning.
    Open,
    /// Deny any pod with an image that cannot be pinned.
    Closed,
}

#[derive(Debug, Clone)]
pub struct AdmissionSettings {
    /// Only pods created in this namespace are changed.
    pub namespace: String,
    /// ... and only pods that carry this label (Porch's `fn.kpt.dev/image`).
    pub function_label: String,
    /// Secret injected for images whose registry needs credentials.
    pub pull_secret: String,
    pub failure_mode: FailureMode,
    /// Pin the function container's image too; its entrypoint is checked
    /// either way.
    pub pin_function_image: bool,
    /// Budget when the request carries no `?timeout=`.
    pub default_timeout: Duration,
    /// Most distinct images one review resolves (`--max-images-per-review`).
    pub max_images: usize,
}

/// Most warnings one answer carries; past them, one that counts the rest.
const MAX_WARNINGS: usize = 16;

/// The request half of an AdmissionReview, as far as we read it. The object
/// stays raw JSON until it is known to be a Pod in scope, then parses once
/// into a typed Pod. kube-core's `AdmissionReview<DynamicObject>` goes through
/// serde `flatten` and needs a second conversion into `Pod`: measured in
/// process (`cargo bench --bench cache_hit`), this envelope about halves a
/// cached function-pod decision (p50 88 µs before, 39-44 µs after).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope<'a> {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(borrow, default)]
    request: Option<RawRequest<'a>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRequest<'a> {
    uid: String,
    kind: GroupVersionKind,
    operation: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(borrow, default)]
    object: Option<&'a RawValue>,
}

#[derive(Debug, Deserialize)]
struct GroupVersionKind {
    #[serde(default)]
    group: String,
    kind: String,
}

/// A request we cannot review: answered with HTTP 400.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("the body is not a JSON AdmissionReview: {0}")]
    Json(String),
    #[error(
        "not an admission.k8s.io/v1 AdmissionReview request (apiVersion, kind or request missing or wrong)"
    )]
    NotARequest,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Status {
    code: u16,
    message: String,
}

/// The response half of an AdmissionReview. Written here rather than taken
/// from kube-core because kube-core 5 serializes `patch` as a JSON array of
/// numbers while the API server requires base64 (kube-rs issue 1781).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Response {
    uid: String,
    allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<Status>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    warnings: Vec<String>,
}

/// A complete AdmissionReview answer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReviewResponse {
    api_version: &'static str,
    kind: &'static str,
    pub response: Response,
    /// For logs and metrics: patched, unchanged, denied, failed-open.
    #[serde(skip)]
    pub outcome: &'static str,
}

impl ReviewResponse {
    fn new(response: Response, outcome: &'static str) -> Self {
        Self {
            api_version: "admission.k8s.io/v1",
            kind: "AdmissionReview",
            response,
            outcome,
        }
    }

    fn allow(uid: &str, warnings: Vec<String>, outcome: &'static str) -> Self {
        Self::new(
            Response {
                uid: uid.to_string(),
                allowed: true,
                status: None,
                patch: None,
                patch_type: None,
                warnings,
            },
            outcome,
        )
    }

    fn deny(uid: &str, code: u16, message: String) -> Self {
        Self::new(
            Response {
                uid: uid.to_string(),
                allowed: false,
                status: Some(Status { code, message }),
                patch: None,
                patch_type: None,
                warnings: Vec::new(),
            },
            "denied",
        )
    }

    pub fn allowed(&self) -> bool {
        self.response.allowed
    }

    /// The decoded JSON Patch, if any (tests and logs).
    pub fn patch(&self) -> Option<Vec<u8>> {
        self.response
            .patch
            .as_ref()
            .and_then(|p| BASE64.decode(p).ok())
    }

    pub fn warnings(&self) -> &[String] {
        &self.response.warnings
    }

    pub fn message(&self) -> Option<&str> {
        self.response.status.as_ref().map(|s| s.message.as_str())
    }
}

/// Whether a review is ours to mutate.
#[derive(Debug)]
pub enum Scope {
    /// Not a CREATE of a function pod (labelled) in the function namespace:
    /// admitted unchanged.
    Outside,
    /// In scope, but the object does not read as a Pod.
    NotAPod,
    /// A function pod being created.
    Pod(Box<Pod>),
}

/// A review as far as the webhook reads it.
#[derive(Debug)]
pub struct Decoded {
    pub uid: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub kind: String,
    pub operation: String,
    pub scope: Scope,
}

/// Decodes an AdmissionReview body; a Pod CREATE in `function_namespace`
/// whose pod carries `function_label` is in scope. Pure and synchronous, so
/// it is also what the fuzz target drives.
pub fn decode(
    body: &[u8],
    function_namespace: &str,
    function_label: &str,
) -> Result<Decoded, ReviewError> {
    let review: Envelope<'_> = serde_json::from_slice(body).map_err(|e| {
        // Cut on a character boundary: serde's message can quote multibyte text.
        ReviewError::Json(mutate::clip(&e.to_string(), 200))
    })?;
    // The API server must be speaking v1, or our answer would be misread.
    if review.api_version != "admission.k8s.io/v1" || review.kind != "AdmissionReview" {
        return Err(ReviewError::NotARequest);
    }
    let request = review.request.ok_or(ReviewError::NotARequest)?;
    let is_pod = request.kind.group.is_empty() && request.kind.kind == "Pod";
    let in_scope = is_pod
        && request.operation == "CREATE"
        && request.namespace.as_deref() == Some(function_namespace);
    let scope = if !in_scope {
        Scope::Outside
    } else {
        // One pass from the review's bytes straight into the Pod view.
        match request
            .object
            .and_then(|o| serde_json::from_str::<Pod>(o.get()).ok())
        {
            // The objectSelector already says so; checked again in case the
            // configuration was edited by hand.
            Some(pod) if pod.labels().is_some_and(|l| l.contains_key(function_label)) => {
                Scope::Pod(Box::new(pod))
            }
            Some(_) => Scope::Outside,
            None => Scope::NotAPod,
        }
    };
    Ok(Decoded {
        uid: request.uid,
        namespace: request.namespace,
        name: request.name,
        kind: request.kind.kind,
        operation: request.operation,
        scope,
    })
}

/// Reviews function pods with the shared resolver cache.
#[derive(Debug, Clone)]
pub struct Admitter {
    cache: CachedResolver,
    settings: AdmissionSettings,
    /// The pull-secret mirror, when this process keeps the secret in place:
    /// it watches the Secret, which is only injected once it exists
    /// (whoever wrote it). `None`: injected without checking.
    mirror: Option<Arc<MirrorStatus>>,
    metrics: Option<Arc<Metrics>>,
}

/// One image's outcome for this review.
type Outcome = Result<(Cached, CacheStatus), Failure>;

impl Admitter {
    pub fn new(cache: CachedResolver, settings: AdmissionSettings) -> Self {
        Self {
            cache,
            settings,
            mirror: None,
            metrics: None,
        }
    }

    /// Injects the pull secret only while `mirror` has seen it exist.
    pub fn with_mirror(mut self, mirror: Arc<MirrorStatus>) -> Self {
        self.mirror = Some(mirror);
        self
    }

    /// Counts unpinned containers and replaced entrypoints.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Reviews one AdmissionReview body. `timeout` is the API server's budget
    /// for this call (its `?timeout=` parameter).
    pub async fn review(
        &self,
        body: &[u8],
        timeout: Option<Duration>,
    ) -> Result<ReviewResponse, ReviewError> {
        let decoded = self.decode(body)?;
        Ok(self.review_decoded(decoded, timeout).await)
    }

    /// Reads a review body as this admitter's scope sees it.
    pub fn decode(&self, body: &[u8]) -> Result<Decoded, ReviewError> {
        decode(
            body,
            &self.settings.namespace,
            &self.settings.function_label,
        )
    }

    /// Answers a decoded review. Logs carry one span per review with its
    /// uid, namespace and pod name, at debug level: formatting them on every
    /// review cost a sixth of the throughput at info.
    #[tracing::instrument(
        level = "debug",
        name = "admission",
        skip_all,
        fields(uid, namespace, pod)
    )]
    pub async fn review_decoded(
        &self,
        decoded: Decoded,
        timeout: Option<Duration>,
    ) -> ReviewResponse {
        let uid = decoded.uid;
        let span = tracing::Span::current();
        if !span.is_disabled() {
            span.record("uid", uid.as_str());
            span.record(
                "namespace",
                decoded.namespace.as_deref().unwrap_or_default(),
            );
            span.record("pod", decoded.name.as_deref().unwrap_or_default());
        }
        let pod = match decoded.scope {
            Scope::Outside => {
                debug!(uid, kind = %decoded.kind, operation = %decoded.operation, namespace = ?decoded.namespace, "not a function pod creation; allowed unchanged");
                return ReviewResponse::allow(&uid, Vec::new(), "unchanged");
            }
            Scope::NotAPod => {
                return ReviewResponse::deny(
                    &uid,
                    400,
                    "the review's object is not a valid Pod".into(),
                );
            }
            Scope::Pod(pod) => pod,
        };
        if decoded.name.is_none() && !span.is_disabled() {
            span.record(
                "pod",
                pod.metadata
                    .as_ref()
                    .and_then(|m| m.name.as_deref().or(m.generate_name.as_deref()))
                    .unwrap_or_default(),
            );
        }
        let budget = budget(timeout.unwrap_or(self.settings.default_timeout));
        self.mutate(&uid, &pod, budget).await
    }

    /// The answer to review `uid` when reviewing it failed inside (a bug):
    /// per the failure mode, admitted unchanged with a warning (open) or
    /// denied (closed). The API server reads no body but a 200 review's.
    pub fn internal_failure(&self, uid: &str) -> ReviewResponse {
        let reason =
            "fn-image-resolver failed reviewing this pod (an internal error, logged and counted)";
        match self.settings.failure_mode {
            FailureMode::Open => ReviewResponse::allow(
                uid,
                vec![format!("{reason}; admitted unchanged")],
                "failed-open",
            ),
            FailureMode::Closed => ReviewResponse::deny(uid, 500, reason.into()),
        }
    }

    /// Resolves what the pod needs resolved, within `budget`: at most
    /// `max_images` distinct images (the function's first); the count of the
    /// others comes back too. Cache hits are answered here; misses run as
    /// tasks, and one that misses the deadline still finishes and fills the
    /// cache for the API server's retry.
    async fn resolve_all<'p>(
        &self,
        pod: &'p Pod,
        budget: Duration,
    ) -> (HashMap<&'p str, Outcome>, Vec<&'p str>) {
        let deadline = tokio::time::Instant::now() + budget;
        let mut outcomes = HashMap::new();
        let mut pending = Vec::new();
        let mut images = mutate::images_to_resolve(pod);
        let over = images.split_off(images.len().min(self.settings.max_images));
        for image in images {
            match self.cache.resolve_cached(image) {
                Some(outcome) => {
                    outcomes.insert(image, outcome.map_err(|e| self.failure(image, &e)));
                }
                None => {
                    let cache = self.cache.clone();
                    let owned = image.to_string();
                    let task = tokio::spawn(
                        async move { cache.resolve_for_pod(&owned).await }.in_current_span(),
                    );
                    pending.push((image, task));
                }
            }
        }
        // The tasks run concurrently; waiting for each in turn until the
        // one deadline costs no more than waiting for all.
        for (image, mut task) in pending {
            let outcome = match tokio::time::timeout_at(deadline, &mut task).await {
                Ok(Ok(outcome)) => outcome.map_err(|e| self.failure(image, &e)),
                Ok(Err(join)) => Err(Failure {
                    kind: FailureKind::Internal,
                    message: format!("resolving {image} failed: {join}"),
                    needs_pull_secret: self.cache.needs_pull_secret(image),
                }),
                Err(_) => Err(Failure {
                    kind: FailureKind::Deadline,
                    message: format!(
                        "{image} was not resolved within the {}ms admission budget",
                        budget.as_millis()
                    ),
                    needs_pull_secret: self.cache.needs_pull_secret(image),
                }),
            };
            outcomes.insert(image, outcome);
        }
        (outcomes, over)
    }

    fn failure(&self, image: &str, error: &ResolveError) -> Failure {
        Failure {
            kind: FailureKind::Resolve(error.kind()),
            message: error.to_string(),
            needs_pull_secret: self.cache.needs_pull_secret(image),
        }
    }

    async fn mutate(&self, uid: &str, pod: &Pod, budget: Duration) -> ReviewResponse {
        let (outcomes, over) = self.resolve_all(pod, budget).await;
        let mut warnings = Vec::new();
        if !over.is_empty() {
            let said = format!(
                "the pod has {} distinct images to pin, more than --max-images-per-review={}",
                over.len() + self.settings.max_images,
                self.settings.max_images
            );
            if self.settings.failure_mode == FailureMode::Closed {
                info!(uid, reason = %said, "function pod denied");
                return ReviewResponse::deny(
                    uid,
                    400,
                    format!("{said}; --failure-mode closed denies such pods"),
                );
            }
            warnings.push(format!(
                "{said}: {} of them left as written, not pinned",
                over.len()
            ));
            if let Some(metrics) = &self.metrics {
                for _ in &over {
                    metrics.admission_unpinned("too-many-images");
                }
            }
        }
        let over: HashSet<&str> = over.into_iter().collect();
        for (image, outcome) in &outcomes {
            if let Ok((_, CacheStatus::Stale)) = outcome {
                warnings.push(format!(
                    "{image}: pinned from a cached answer that could not be revalidated yet"
                ));
            }
        }
        let lookup = |image: &str| -> Option<Resolved<'_>> {
            match outcomes.get(image) {
                Some(Ok((cached, _))) => cached.answer().map(Resolved::Answer),
                Some(Err(failure)) => Some(Resolved::Failed(failure)),
                // Past the limit: left alone.
                None if over.contains(image) => None,
                None => Some(Resolved::Skipped {
                    needs_pull_secret: self.cache.needs_pull_secret(image),
                }),
            }
        };
        let options = Options {
            failure_mode: self.settings.failure_mode,
            pin_function_image: self.settings.pin_function_image,
            pull_secret: Some(PullSecret {
                name: &self.settings.pull_secret,
                exists: self.mirror.as_ref().is_none_or(|m| m.secret_exists()),
            }),
        };
        let mutation = match mutate::plan(pod, &lookup, &options) {
            Ok(m) => m,
            Err(denial) => {
                info!(uid, reason = %denial, "function pod denied");
                return ReviewResponse::deny(uid, denial.code(), denial.to_string());
            }
        };
        if let Some(metrics) = &self.metrics {
            for unpinned in mutation.unpinned.values() {
                metrics.admission_unpinned(unpinned.kind.as_str());
            }
            metrics.admission_entrypoints_replaced(mutation.entrypoints_replaced);
        }
        for (container, unpinned) in &mutation.unpinned {
            warn!(uid, container, image = %unpinned.image, reason = %unpinned.reason, "container admitted unpinned (failure mode open)");
        }
        if mutation.entrypoints_replaced > 0 {
            warn!(
                uid,
                "function entrypoint replaced: it did not match the pinned image"
            );
        }
        warnings.extend(mutation.warnings);
        if warnings.len() > MAX_WARNINGS {
            let more = warnings.len() - (MAX_WARNINGS - 1);
            warnings.truncate(MAX_WARNINGS - 1);
            warnings.push(format!("… and {more} more warnings like these"));
        }
        let outcome = if !mutation.unpinned.is_empty() || !over.is_empty() {
            "failed-open"
        } else if mutation.operations.is_empty() {
            "unchanged"
        } else {
            "patched"
        };
        if mutation.operations.is_empty() {
            return ReviewResponse::allow(uid, warnings, outcome);
        }
        let patch = match serde_json::to_vec(&mutation.operations) {
            Ok(p) => p,
            // Cannot happen (strings and arrays only); never block a pod on it.
            Err(e) => {
                warn!(uid, error = %e, "cannot serialize the patch; admitting the pod unchanged");
                return ReviewResponse::allow(uid, warnings, "failed-open");
            }
        };
        debug!(
            pinned = mutation.pinned.len(),
            pull_secret_added = mutation.pull_secret_added,
            "function pod mutated"
        );
        let mut response = ReviewResponse::allow(uid, warnings, outcome);
        response.response.patch = Some(BASE64.encode(patch));
        response.response.patch_type = Some("JSONPatch");
        response
    }
}

/// The longest timeout the API server gives a webhook (`timeoutSeconds`
/// is at most 30); a larger `?timeout=` is taken as this.
const MAX_TIMEOUT: Duration = Duration::from_secs(30);

/// The part of the API server's timeout we use, keeping room to send the
/// answer back: 80%, and never less than 100 ms.
fn budget(timeout: Duration) -> Duration {
    (timeout.min(MAX_TIMEOUT) * 4 / 5).max(Duration::from_millis(100))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_internal_failure_follows_the_failure_mode() {
        for (mode, allowed) in [(FailureMode::Open, true), (FailureMode::Closed, false)] {
            let settings = AdmissionSettings {
                namespace: "porch-fn-system".into(),
                function_label: "fn.kpt.dev/image".into(),
                pull_secret: "auth-secret".into(),
                failure_mode: mode,
                pin_function_image: true,
                default_timeout: Duration::from_secs(10),
                max_images: 32,
            };
            let resolver = crate::registry::Resolver::new(&crate::registry::ResolverSettings {
                default_prefix: String::new(),
                platform: "linux/amd64".parse().expect("platform"),
                private_registries: false,
                docker_config_path: "/nonexistent".into(),
                pull_secret_name: "auth-secret".into(),
                tls_ca_dir: None,
                insecure_hosts: Vec::new(),
                request_timeout: Duration::from_secs(1),
                resolve_timeout: Duration::from_secs(1),
                max_concurrent_fetches: 1,
                registry_config_path: None,
                wait_for_files: false,
            })
            .expect("resolver");
            let cache = CachedResolver::new(
                Arc::new(resolver),
                crate::cache::CacheSettings::default(),
                Metrics::new(),
            );
            let answer = Admitter::new(cache, settings).internal_failure("the-uid");
            assert_eq!(answer.allowed(), allowed);
            assert_eq!(answer.response.uid, "the-uid");
            assert!(answer.patch().is_none());
        }
    }

    #[test]
    fn the_budget_is_bounded_whatever_the_request_says() {
        assert_eq!(budget(Duration::from_secs(10)), Duration::from_secs(8));
        assert_eq!(budget(Duration::ZERO), Duration::from_millis(100));
        assert_eq!(budget(Duration::MAX), Duration::from_secs(24));
        assert_eq!(
            budget(Duration::from_secs(u64::MAX)),
            Duration::from_secs(24)
        );
    }

    #[test]
    fn a_json_error_quoting_multibyte_text_is_cut_on_a_character_boundary() {
        // serde_json's message quotes the string; 200 bytes in, a character
        // of several bytes straddles the cut.
        // One of the two puts the 200th byte inside a two-byte character.
        for pad in ["", "a"] {
            let body = format!(
                r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{{"uid":"u","kind":"{pad}{}","operation":"CREATE"}}}}"#,
                "é".repeat(300)
            );
            match decode(body.as_bytes(), "porch-fn-system", "fn.kpt.dev/image") {
                Err(ReviewError::Json(message)) => {
                    assert!(message.starts_with("invalid type: string"), "{message}");
                    assert!(message.chars().count() <= 201);
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
