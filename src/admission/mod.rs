//! The mutating admission webhook: AdmissionReview in, JSON Patch out.

pub mod mutate;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tracing::{debug, info, warn};

use self::mutate::Pod;
use crate::cache::{CacheStatus, Cached, CachedResolver};
use crate::registry::ResolveError;
use crate::secrets::MirrorStatus;

/// What to do when the registry cannot answer in time (transient failures).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FailureMode {
    /// Admit the pod unchanged, with a warning.
    Open,
    /// Deny the pod.
    Closed,
}

#[derive(Debug, Clone)]
pub struct AdmissionSettings {
    /// Only pods created in this namespace are changed.
    pub namespace: String,
    /// Secret injected for images whose registry needs credentials.
    pub pull_secret: String,
    pub failure_mode: FailureMode,
    /// Budget when the request carries no `?timeout=`.
    pub default_timeout: Duration,
}

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
    /// Not a Pod CREATE in the function namespace: admitted unchanged.
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

/// Decodes an AdmissionReview body; `function_namespace` decides the scope.
/// Pure and synchronous, so it is also what the fuzz target drives.
pub fn decode(body: &[u8], function_namespace: &str) -> Result<Decoded, ReviewError> {
    let review: Envelope<'_> = serde_json::from_slice(body).map_err(|e| {
        let mut msg = e.to_string();
        msg.truncate(200);
        ReviewError::Json(msg)
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
            Some(pod) => Scope::Pod(Box::new(pod)),
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
    /// the secret is only injected once it exists.
    mirror: Option<Arc<MirrorStatus>>,
}

impl Admitter {
    pub fn new(cache: CachedResolver, settings: AdmissionSettings) -> Self {
        Self {
            cache,
            settings,
            mirror: None,
        }
    }

    pub fn with_mirror(mut self, mirror: Arc<MirrorStatus>) -> Self {
        self.mirror = Some(mirror);
        self
    }

    /// Reviews one AdmissionReview body. `timeout` is the API server's budget
    /// for this call (its `?timeout=` parameter). Logs carry one span per
    /// review with its uid, namespace and pod name.
    #[tracing::instrument(name = "admission", skip_all, fields(uid, namespace, pod))]
    pub async fn review(
        &self,
        body: &[u8],
        timeout: Option<Duration>,
    ) -> Result<ReviewResponse, ReviewError> {
        let decoded = decode(body, &self.settings.namespace)?;
        let uid = decoded.uid;
        let span = tracing::Span::current();
        span.record("uid", uid.as_str());
        span.record(
            "namespace",
            decoded.namespace.as_deref().unwrap_or_default(),
        );
        span.record("pod", decoded.name.as_deref().unwrap_or_default());
        let pod = match decoded.scope {
            Scope::Outside => {
                debug!(uid, kind = %decoded.kind, operation = %decoded.operation, namespace = ?decoded.namespace, "not a function pod creation; allowed unchanged");
                return Ok(ReviewResponse::allow(&uid, Vec::new(), "unchanged"));
            }
            Scope::NotAPod => {
                return Ok(ReviewResponse::deny(
                    &uid,
                    400,
                    "the review's object is not a valid Pod".into(),
                ));
            }
            Scope::Pod(pod) => pod,
        };
        if decoded.name.is_none() {
            span.record(
                "pod",
                pod.metadata
                    .as_ref()
                    .and_then(|m| m.name.as_deref().or(m.generate_name.as_deref()))
                    .unwrap_or_default(),
            );
        }
        let budget = budget(timeout.unwrap_or(self.settings.default_timeout));
        Ok(self.mutate(&uid, &pod, budget).await)
    }

    async fn mutate(&self, uid: &str, pod: &Pod, budget: Duration) -> ReviewResponse {
        let images: BTreeSet<String> = pod
            .spec
            .iter()
            .flat_map(|s| s.init_containers.iter().flatten().chain(&s.containers))
            .filter_map(|c| c.image.clone())
            .filter(|i| !i.is_empty())
            .collect();
        // Cache hits are answered here. Misses run as tasks: one that misses
        // the deadline still finishes and fills the cache for the API
        // server's retry.
        let mut outcomes = Vec::with_capacity(images.len());
        let mut pending = Vec::new();
        for image in &images {
            match self.cache.resolve_cached(image) {
                Some(outcome) => outcomes.push((image, outcome)),
                None => {
                    let cache = self.cache.clone();
                    let owned = image.clone();
                    let task = tokio::spawn(async move { cache.resolve_for_pod(&owned).await });
                    pending.push((image, task));
                }
            }
        }
        if !pending.is_empty() {
            let (names, tasks): (Vec<_>, Vec<_>) = pending.into_iter().unzip();
            let joined = tokio::time::timeout(budget, futures_util::future::join_all(tasks)).await;
            let Ok(joined) = joined else {
                return self.transient(
                    uid,
                    format!(
                        "image resolution did not finish within the {}ms admission budget",
                        budget.as_millis()
                    ),
                );
            };
            for (image, result) in names.into_iter().zip(joined) {
                match result {
                    Ok(outcome) => outcomes.push((image, outcome)),
                    Err(join) => {
                        return self.transient(uid, format!("resolving {image} failed: {join}"));
                    }
                }
            }
            // The first failing image in name order decides, as before.
            outcomes.sort_by(|a, b| a.0.cmp(b.0));
        }
        let mut resolved: HashMap<String, Cached> = HashMap::new();
        let mut warnings = Vec::new();
        for (image, outcome) in outcomes {
            match outcome {
                Ok((resolution, status)) => {
                    if status == CacheStatus::Stale {
                        warnings.push(format!(
                            "{image}: pinned from a cached answer that could not be revalidated yet"
                        ));
                    }
                    resolved.insert(image.clone(), resolution);
                }
                Err(e) if e.kind().is_definitive() => {
                    return ReviewResponse::deny(uid, deny_code(&e), e.to_string());
                }
                Err(e) => return self.transient(uid, e.to_string()),
            }
        }
        // Seed: "pod creation fails if secret required but unavailable".
        if let Some(mirror) = &self.mirror
            && !mirror.is_synced()
            && resolved.values().any(Cached::needs_pull_secret)
        {
            return ReviewResponse::deny(
                uid,
                503,
                format!(
                    "the pod needs pull secret {:?}, which is not in namespace {} yet: {}",
                    self.settings.pull_secret,
                    self.settings.namespace,
                    mirror
                        .last_error()
                        .unwrap_or_else(|| "the secret mirror has not synced yet".into())
                ),
            );
        }
        let lookup = |image: &str| resolved.get(image).and_then(Cached::answer);
        let mutation = match mutate::plan(pod, &lookup, Some(&self.settings.pull_secret)) {
            Ok(m) => m,
            Err(e) => return ReviewResponse::deny(uid, 400, e.to_string()),
        };
        if mutation.operations.is_empty() {
            return ReviewResponse::allow(uid, warnings, "unchanged");
        }
        let patch = match serde_json::to_vec(&mutation.operations) {
            Ok(p) => p,
            Err(e) => return self.transient(uid, format!("cannot serialize the patch: {e}")),
        };
        info!(
            pinned = mutation.pinned.len(),
            pull_secret_added = mutation.pull_secret_added,
            "function pod mutated"
        );
        let mut response = ReviewResponse::allow(uid, warnings, "patched");
        response.response.patch = Some(BASE64.encode(patch));
        response.response.patch_type = Some("JSONPatch");
        response
    }

    /// The registry could not give an answer in time: admit unchanged with a
    /// warning, or deny, per `--failure-mode`.
    fn transient(&self, uid: &str, reason: String) -> ReviewResponse {
        match self.settings.failure_mode {
            FailureMode::Open => {
                warn!(
                    uid,
                    reason, "admitting the pod unchanged (failure mode open)"
                );
                ReviewResponse::allow(
                    uid,
                    vec![format!(
                        "fn-image-resolver could not pin this pod's images and admitted it unchanged: {reason}"
                    )],
                    "failed-open",
                )
            }
            FailureMode::Closed => {
                ReviewResponse::deny(uid, 503, format!("cannot pin the pod's images: {reason}"))
            }
        }
    }
}

fn deny_code(error: &ResolveError) -> u16 {
    match error.kind() {
        crate::registry::ErrorKind::InvalidReference => 400,
        crate::registry::ErrorKind::NotFound | crate::registry::ErrorKind::PlatformNotFound => 404,
        _ => 403,
    }
}

/// The part of the API server's timeout we use, keeping room to send the
/// answer back: 80%, and never less than 100 ms.
fn budget(timeout: Duration) -> Duration {
    (timeout * 4 / 5).max(Duration::from_millis(100))
}
