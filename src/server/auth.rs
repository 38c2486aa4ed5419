//! Bearer-token authentication for the resolver on the HTTPS listener. An
//! open resolver is a credential oracle (it answers with what our registry
//! credentials can see) and an SSRF tool (it makes us contact any host), so
//! off loopback it only answers callers holding a token from
//! `--resolver-token-file`, or, in a cluster, a token the API server vouches
//! for (TokenReview) whose user or group is in `--resolver-allowed-subjects`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use tracing::{debug, warn};

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

/// The accepted tokens, kept only as SHA-256 digests.
#[derive(Clone)]
pub struct Tokens {
    digests: Arc<Vec<[u8; 32]>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("count", &self.digests.len())
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("cannot read --resolver-token-file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--resolver-token-file {0} holds no token (one per line; # starts a comment)")]
    Empty(PathBuf),
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Tokens {
    /// One token per line; blank lines and `#` comments are skipped; anything
    /// after the first comma (a caller's name, as in Kubernetes token files)
    /// is ignored.
    pub fn load(path: &Path) -> Result<Self, TokenFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let digests: Vec<[u8; 32]> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| digest(l.split(',').next().unwrap_or(l).trim()))
            .collect();
        if digests.is_empty() {
            return Err(TokenFileError::Empty(path.to_path_buf()));
        }
        Ok(Self {
            digests: Arc::new(digests),
        })
    }

    /// Compares digests in constant time, against every token, so the time
    /// taken says nothing about how close a guess was.
    fn accepts(&self, token: &str) -> bool {
        let presented = digest(token);
        let mut found = subtle::Choice::from(0);
        for d in self.digests.iter() {
            found |= d.ct_eq(&presented);
        }
        found.into()
    }
}

/// How callers of the HTTPS resolver prove who they are.
#[derive(Debug, Clone)]
pub enum Authenticator {
    /// A static token file (outside a cluster).
    Tokens(Tokens),
    /// The API server's TokenReview, then an allowed-subjects check.
    TokenReview(Box<TokenReviewer>),
}

/// What became of one presented token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Allowed,
    /// Authenticated, but not one of the allowed subjects.
    Forbidden,
    Unauthenticated,
    /// Too many TokenReviews in flight already: try again shortly.
    Busy,
}

impl Verdict {
    fn as_str(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Forbidden => "forbidden",
            Self::Unauthenticated => "unauthenticated",
            Self::Busy => "busy",
        }
    }
}

/// How callers are reviewed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenReviewSettings {
    /// User names (`system:serviceaccount:NS:NAME`) or groups
    /// (`system:serviceaccounts:NS`) that may use the resolver.
    pub allowed_subjects: Vec<String>,
    /// Audiences a token must be meant for; empty: the API server's own.
    pub audiences: Vec<String>,
    /// How long the verdict on a token the API server accepted is reused.
    /// Short: a deleted ServiceAccount or a revoked token stops working
    /// within this.
    pub verdict_ttl: Duration,
}

/// How long a refusal is reused: briefly, so that a token that just became
/// valid works soon, and separately from acceptances, so that a flood of
/// unknown tokens cannot push the good verdicts out.
const REFUSAL_TTL: Duration = Duration::from_secs(5);
/// Most verdicts of each kind kept.
const MAX_VERDICTS: usize = 4096;
/// Most TokenReviews in flight at once: unknown tokens must not make us an
/// amplifier against the API server.
const MAX_REVIEWS_IN_FLIGHT: usize = 4;
/// How long a caller waits for a free review slot before a 503.
const REVIEW_SLOT_WAIT: Duration = Duration::from_secs(1);

/// Asks the API server who a bearer token belongs to. Verdicts are kept
/// briefly (by the token's SHA-256, never the token) so a busy caller does
/// not cost one TokenReview per request.
#[derive(Clone)]
pub struct TokenReviewer {
    api: Api<TokenReview>,
    settings: Arc<TokenReviewSettings>,
    /// Token SHA-256 → verdict (allowed or forbidden) and when it was given.
    accepted: Arc<quick_cache::sync::Cache<[u8; 32], (Verdict, Instant)>>,
    /// Token SHA-256 → when the API server refused it.
    refused: Arc<quick_cache::sync::Cache<[u8; 32], Instant>>,
    slots: Arc<tokio::sync::Semaphore>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl TokenReviewer {
    pub fn new(client: kube::Client, settings: TokenReviewSettings) -> Self {
        Self {
            api: Api::all(client),
            settings: Arc::new(settings),
            accepted: Arc::new(quick_cache::sync::Cache::new(MAX_VERDICTS)),
            refused: Arc::new(quick_cache::sync::Cache::new(MAX_VERDICTS)),
            slots: Arc::new(tokio::sync::Semaphore::new(MAX_REVIEWS_IN_FLIGHT)),
            metrics: None,
        }
    }

    /// Counts verdicts in `token_reviews_total`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Verdict> {
        if let Some((verdict, at)) = self.accepted.get(key)
            && at.elapsed() < self.settings.verdict_ttl
        {
            return Some(verdict);
        }
        if let Some(at) = self.refused.get(key)
            && at.elapsed() < REFUSAL_TTL.min(self.settings.verdict_ttl)
        {
            return Some(Verdict::Unauthenticated);
        }
        None
    }

    async fn verdict(&self, token: &str) -> Result<Verdict, kube::Error> {
        let key = digest(token);
        if let Some(verdict) = self.cached(&key) {
            return Ok(verdict);
        }
        let Ok(Ok(_slot)) =
            tokio::time::timeout(REVIEW_SLOT_WAIT, self.slots.clone().acquire_owned()).await
        else {
            self.count("busy");
            return Ok(Verdict::Busy);
        };
        // Another caller with the same token may have been answered meanwhile.
        if let Some(verdict) = self.cached(&key) {
            return Ok(verdict);
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: (!self.settings.audiences.is_empty())
                    .then(|| self.settings.audiences.clone()),
            },
            ..TokenReview::default()
        };
        let answer = match self.api.create(&PostParams::default(), &review).await {
            Ok(answer) => answer,
            Err(e) => {
                self.count("error");
                return Err(e);
            }
        };
        let status = answer.status.unwrap_or_default();
        let verdict = match status.user.filter(|_| status.authenticated == Some(true)) {
            None => Verdict::Unauthenticated,
            Some(user) => {
                let name = user.username.unwrap_or_default();
                let groups = user.groups.unwrap_or_default();
                let allowed = self
                    .settings
                    .allowed_subjects
                    .iter()
                    .any(|a| *a == name || groups.contains(a));
                if allowed {
                    debug!(user = %name, "resolver caller allowed");
                    Verdict::Allowed
                } else {
                    warn!(user = %name, "resolver caller authenticated but not in --resolver-allowed-subjects");
                    Verdict::Forbidden
                }
            }
        };
        self.count(verdict.as_str());
        match verdict {
            Verdict::Unauthenticated => self.refused.insert(key, Instant::now()),
            _ => self.accepted.insert(key, (verdict, Instant::now())),
        }
        Ok(verdict)
    }

    fn count(&self, result: &'static str) {
        if let Some(metrics) = &self.metrics {
            metrics.token_review(result);
        }
    }
}

impl Authenticator {
    async fn verdict(&self, token: Option<&str>) -> Result<Verdict, kube::Error> {
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return Ok(Verdict::Unauthenticated);
        };
        match self {
            Self::Tokens(tokens) => Ok(if tokens.accepts(token) {
                Verdict::Allowed
            } else {
                Verdict::Unauthenticated
            }),
            Self::TokenReview(reviewer) => reviewer.verdict(token).await,
        }
    }
}

fn refusal(status: StatusCode, kind: &str, message: &str) -> Response {
    let mut resp = (
        status,
        axum::Json(json!({"error": {"kind": kind, "message": message}})),
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"fn-image-resolver\""),
        );
    }
    resp
}

/// Unknown callers get 401, known but not allowed ones 403; neither answer
/// says anything about registries.
pub async fn require_token(
    State(auth): State<Authenticator>,
    request: Request,
    next: Next,
) -> Response {
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match auth.verdict(token).await {
        Ok(Verdict::Allowed) => next.run(request).await,
        Ok(Verdict::Forbidden) => refusal(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this identity may not use the resolver",
        ),
        Ok(Verdict::Unauthenticated) => refusal(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "a valid bearer token is required",
        ),
        Ok(Verdict::Busy) => {
            let mut resp = refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "too many callers are being checked right now; retry shortly",
            );
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            resp
        }
        Err(e) => {
            warn!(error = %e, "cannot review a resolver caller's token");
            refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the caller's token cannot be checked right now",
            )
        }
    }
}
