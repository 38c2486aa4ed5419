//! A small OCI distribution client: just the reads a resolver needs.
//!
//! Written on reqwest instead of using `oci-client` because this product needs
//! what that client keeps to itself: the status and headers of every response
//! (429 `Retry-After`, typed not-found vs unauthorized), one shared client for
//! all credentials, authentication driven by the challenge of the request we
//! actually need (oci-client pings `/v2/` before every first pull of a
//! repository), tokens shared across concurrent requests, the seed's
//! TLS → system roots → plain HTTP ladder per host, and hard size limits on
//! what we read. See the README's design section.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode, header};
use rustls::RootCertStore;
use serde::Deserialize;
use tracing::{debug, warn};

use super::auth::{AuthCache, Challenge, Credential, HostAuth, TokenResponse};
use super::error::RegistryError;
use super::reference::normalize_host;

/// Every manifest type we understand, so distribution 2.8 never answers 404 for
/// a type we did not ask for.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

const USER_AGENT: &str = concat!("fn-image-resolver/", env!("CARGO_PKG_VERSION"));
/// Token responses and error bodies are small; anything bigger is not one.
const MAX_SMALL_BODY: usize = 64 * 1024;

/// How to reach registries.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// CA from `--tls-secret-path`, when `--enable-private-registries-tls` is on.
    pub mounted_ca: Option<RootCertStore>,
    /// System trust store (`None` when the machine has none).
    pub system_roots: Option<RootCertStore>,
    /// Normalized hosts that may be reached over plain HTTP (last ladder step).
    pub insecure_hosts: HashSet<String>,
    pub connect_timeout: Duration,
    /// Limit for one HTTP exchange (headers and body).
    pub request_timeout: Duration,
    pub max_manifest_bytes: usize,
    pub max_config_bytes: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            mounted_ca: None,
            system_roots: None,
            insecure_hosts: HashSet::new(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(15),
            max_manifest_bytes: 4 * 1024 * 1024,
            max_config_bytes: 8 * 1024 * 1024,
        }
    }
}

/// One step of the seed's connection ladder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rung {
    MountedCa,
    SystemRoots,
    PlainHttp,
}

impl Rung {
    fn describe(self) -> &'static str {
        match self {
            Self::MountedCa => "the mounted CA",
            Self::SystemRoots => "the system roots",
            Self::PlainHttp => "plain HTTP",
        }
    }
}

/// Which repository on which registry, with which credential.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// Host the API is served from (`registry-1.docker.io` for Docker Hub).
    pub host: &'a str,
    /// Normalized registry name, for messages and for `--insecure-registry`.
    pub registry: &'a str,
    pub repository: &'a str,
    pub credential: Option<&'a Credential>,
}

/// A manifest as served.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub body: Vec<u8>,
    pub content_type: Option<String>,
    /// `Docker-Content-Digest`, when the registry sent one.
    pub digest_header: Option<String>,
}

/// What a registry request cost, for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestKind {
    Manifest,
    ManifestHead,
    Blob,
    Token,
}

impl RequestKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Manifest => "manifest",
            Self::ManifestHead => "manifest_head",
            Self::Blob => "blob",
            Self::Token => "token",
        }
    }
}

/// Receives one call per HTTP request sent to a registry or token server.
pub trait RequestObserver: Send + Sync + std::fmt::Debug {
    /// `status` is `None` when no response arrived.
    fn observe(&self, registry: &str, kind: RequestKind, status: Option<u16>, elapsed: Duration);

    /// A registry announced its pull limit (`RateLimit-Limit`,
    /// `RateLimit-Remaining`, as Docker Hub sends them).
    fn rate_limit(&self, _registry: &str, _limit: Option<u64>, _remaining: Option<u64>) {}
}

/// The count in a rate-limit header: `100;w=21600` → 100. Also accepts the
/// `X-RateLimit-*` spelling some registries use.
fn rate_limit_header(headers: &reqwest::header::HeaderMap, name: &str) -> Option<u64> {
    [name.to_string(), format!("x-{name}")]
        .iter()
        .find_map(|n| headers.get(n.as_str()))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .and_then(|v| v.trim().parse().ok())
}

/// The client. Cheap to share behind an `Arc`; connections are pooled per rung.
#[derive(Debug)]
pub struct RegistryClient {
    mounted_ca: Option<reqwest::Client>,
    system: reqwest::Client,
    /// Trusts mounted CA and system roots: token servers may sit on either.
    token: reqwest::Client,
    insecure: HashSet<String>,
    /// The rung that last worked per host, so the ladder is climbed once.
    rungs: Mutex<HashMap<String, Rung>>,
    auth: AuthCache,
    max_manifest_bytes: usize,
    max_config_bytes: usize,
    request_timeout: Duration,
    observer: Option<Arc<dyn RequestObserver>>,
}

/// Failure of one attempt, before deciding whether the ladder goes on.
enum Attempt {
    /// The TLS handshake failed: the next rung may work.
    Tls(String),
    Failed(RegistryError),
}

impl RegistryClient {
    pub fn new(options: ClientOptions) -> Result<Self, reqwest::Error> {
        let build = |roots: RootCertStore| {
            reqwest::Client::builder()
                .use_preconfigured_tls(super::tls::client_config(roots).as_ref().clone())
                .user_agent(USER_AGENT)
                .connect_timeout(options.connect_timeout)
                .timeout(options.request_timeout)
                .pool_idle_timeout(Duration::from_secs(90))
                .redirect(redirect_policy())
                .build()
        };
        let system_roots = options
            .system_roots
            .clone()
            .unwrap_or_else(RootCertStore::empty);
        let mut combined = system_roots.clone();
        if let Some(ca) = &options.mounted_ca {
            combined.roots.extend(ca.roots.iter().cloned());
        }
        Ok(Self {
            mounted_ca: options.mounted_ca.clone().map(build).transpose()?,
            system: build(system_roots)?,
            token: build(combined)?,
            insecure: options
                .insecure_hosts
                .iter()
                .map(|h| normalize_host(h))
                .collect(),
            rungs: Mutex::new(HashMap::new()),
            auth: AuthCache::default(),
            max_manifest_bytes: options.max_manifest_bytes,
            max_config_bytes: options.max_config_bytes,
            request_timeout: options.request_timeout,
            observer: None,
        })
    }

    pub fn with_observer(mut self, observer: Arc<dyn RequestObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Is `registry` allowed over plain HTTP (`--insecure-registry`)?
    pub fn is_insecure(&self, registry: &str) -> bool {
        self.insecure.contains(&normalize_host(registry))
    }

    /// GET a manifest (by tag or digest).
    pub async fn get_manifest(
        &self,
        target: &Target<'_>,
        reference: &str,
    ) -> Result<Manifest, RegistryError> {
        let path = format!("/v2/{}/manifests/{reference}", target.repository);
        let what = format!("manifest {}:{reference}", target.repository);
        let resp = self
            .send(target, Method::GET, &path, RequestKind::Manifest, &what)
            .await?;
        let resp = check_status(resp, target, &what).await?;
        let content_type = header_str(&resp, header::CONTENT_TYPE);
        let digest_header = header_str(&resp, "docker-content-digest");
        let body = read_limited(
            resp,
            self.max_manifest_bytes,
            self.request_timeout,
            target,
            &what,
        )
        .await?;
        Ok(Manifest {
            body,
            content_type,
            digest_header,
        })
    }

    /// HEAD a manifest: its digest without its body (Docker Hub does not count
    /// HEADs against pull limits). `None` when the registry sent no digest.
    pub async fn head_manifest(
        &self,
        target: &Target<'_>,
        reference: &str,
    ) -> Result<Option<String>, RegistryError> {
        let path = format!("/v2/{}/manifests/{reference}", target.repository);
        let what = format!("manifest {}:{reference}", target.repository);
        let resp = self
            .send(
                target,
                Method::HEAD,
                &path,
                RequestKind::ManifestHead,
                &what,
            )
            .await?;
        let resp = check_status(resp, target, &what).await?;
        Ok(header_str(&resp, "docker-content-digest"))
    }

    /// GET a config blob, at most `max_config_bytes`.
    pub async fn get_config_blob(
        &self,
        target: &Target<'_>,
        digest: &str,
    ) -> Result<Vec<u8>, RegistryError> {
        let path = format!("/v2/{}/blobs/{digest}", target.repository);
        let what = format!("config blob {digest}");
        let resp = self
            .send(target, Method::GET, &path, RequestKind::Blob, &what)
            .await?;
        let resp = check_status(resp, target, &what).await?;
        read_limited(
            resp,
            self.max_config_bytes,
            self.request_timeout,
            target,
            &what,
        )
        .await
    }

    fn ladder(&self, target: &Target<'_>) -> Vec<Rung> {
        let mut ladder = Vec::with_capacity(3);
        if self.mounted_ca.is_some() {
            ladder.push(Rung::MountedCa);
        }
        ladder.push(Rung::SystemRoots);
        if self.is_insecure(target.registry) {
            ladder.push(Rung::PlainHttp);
        }
        // Start where the last success was; earlier rungs failed before.
        if let Some(known) = lock(&self.rungs).get(target.host)
            && let Some(pos) = ladder.iter().position(|r| r == known)
        {
            ladder.drain(..pos);
        }
        ladder
    }

    /// Sends a request up the TLS ladder: only a failed TLS handshake moves to
    /// the next rung; not-found, auth failures and timeouts end it at once.
    async fn send(
        &self,
        target: &Target<'_>,
        method: Method,
        path: &str,
        kind: RequestKind,
        what: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        let ladder = self.ladder(target);
        let mut last_tls = String::new();
        for (i, rung) in ladder.iter().copied().enumerate() {
            let mut attempt = self.send_on(rung, target, &method, path, kind).await;
            // A pooled keep-alive connection the registry closed (restart,
            // idle timeout) fails the first request on it; our requests are
            // idempotent reads, so one retry goes out on a fresh connection.
            if matches!(
                attempt,
                Err(Attempt::Failed(RegistryError::Unreachable { .. }))
            ) {
                debug!(
                    registry = target.registry,
                    "connection failed; retrying once on a new connection"
                );
                attempt = self.send_on(rung, target, &method, path, kind).await;
            }
            match attempt {
                Ok(resp) => {
                    let previous = lock(&self.rungs).insert(target.host.to_string(), rung);
                    // Loud, but once per host rather than once per request.
                    if rung == Rung::PlainHttp && previous != Some(Rung::PlainHttp) {
                        warn!(
                            registry = target.registry,
                            "using plain HTTP for an --insecure-registry host; credentials and images are not protected in transit"
                        );
                    }
                    return Ok(resp);
                }
                Err(Attempt::Tls(detail)) => {
                    lock(&self.rungs).remove(target.host);
                    if let Some(next) = ladder.get(i + 1) {
                        warn!(registry = target.registry, error = %detail, "TLS with {} failed; trying {}", rung.describe(), next.describe());
                    }
                    last_tls = format!(
                        "{detail} (tried {})",
                        ladder
                            .iter()
                            .map(|r| r.describe())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
                Err(Attempt::Failed(e)) => {
                    debug!(registry = target.registry, what, error = %e, "registry request failed");
                    return Err(e);
                }
            }
        }
        Err(RegistryError::Tls {
            registry: target.registry.to_string(),
            detail: last_tls,
        })
    }

    async fn send_on(
        &self,
        rung: Rung,
        target: &Target<'_>,
        method: &Method,
        path: &str,
        kind: RequestKind,
    ) -> Result<reqwest::Response, Attempt> {
        let (client, scheme) = match rung {
            Rung::MountedCa => match &self.mounted_ca {
                Some(c) => (c, "https"),
                None => (&self.system, "https"),
            },
            Rung::SystemRoots => (&self.system, "https"),
            Rung::PlainHttp => (&self.system, "http"),
        };
        let url = format!("{scheme}://{}{path}", target.host);
        let scope = format!("repository:{}:pull", target.repository);
        let mut authorization = self
            .authorization(target, &scope)
            .await
            .map_err(Attempt::Failed)?;
        let mut retried = false;
        loop {
            let mut request = client
                .request(method.clone(), &url)
                .header(header::ACCEPT, MANIFEST_ACCEPT);
            if let Some(value) = &authorization {
                request = request.header(header::AUTHORIZATION, value.as_str());
            }
            let started = Instant::now();
            let result = request.send().await;
            self.observe(
                target.registry,
                kind,
                result.as_ref().ok().map(|r| r.status().as_u16()),
                started,
            );
            let resp = result.map_err(|e| classify(e, target.registry, self.request_timeout))?;
            if let Some(o) = &self.observer {
                let limit = rate_limit_header(resp.headers(), "ratelimit-limit");
                let remaining = rate_limit_header(resp.headers(), "ratelimit-remaining");
                if limit.is_some() || remaining.is_some() {
                    o.rate_limit(target.registry, limit, remaining);
                }
            }
            if resp.status() != StatusCode::UNAUTHORIZED || retried {
                return Ok(resp);
            }
            retried = true;
            let challenge = resp
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .and_then(Challenge::parse);
            match challenge {
                Some(Challenge::Bearer {
                    realm,
                    service,
                    scope: asked,
                }) => {
                    let scope = asked.unwrap_or(scope.clone());
                    self.auth.remember_host(
                        target.host,
                        HostAuth::Bearer {
                            realm: realm.clone(),
                            service: service.clone(),
                        },
                    );
                    let cred_id = target.credential.map(Credential::identity);
                    self.auth.forget_token(target.host, &scope, cred_id);
                    let token = self
                        .fetch_token(target, &realm, service.as_deref(), &scope)
                        .await
                        .map_err(Attempt::Failed)?;
                    authorization = Some(format!("Bearer {token}"));
                }
                Some(Challenge::Basic) => {
                    self.auth.remember_host(target.host, HostAuth::Basic);
                    match target.credential.and_then(Credential::basic_header) {
                        Some(basic) if authorization.is_none() => authorization = Some(basic),
                        _ => return Ok(resp),
                    }
                }
                None => return Ok(resp),
            }
        }
    }

    /// The `Authorization` to send before any challenge, from what we learned
    /// about the host earlier: saves the 401 round trip on every later request.
    async fn authorization(
        &self,
        target: &Target<'_>,
        scope: &str,
    ) -> Result<Option<String>, RegistryError> {
        match self.auth.host(target.host) {
            None => Ok(None),
            Some(HostAuth::Basic) => Ok(target.credential.and_then(Credential::basic_header)),
            Some(HostAuth::Bearer { realm, service }) => {
                let cred_id = target.credential.map(Credential::identity);
                if let Some(token) = self.auth.token(target.host, scope, cred_id) {
                    return Ok(Some(format!("Bearer {}", token.expose())));
                }
                let token = self
                    .fetch_token(target, &realm, service.as_deref(), scope)
                    .await?;
                Ok(Some(format!("Bearer {token}")))
            }
        }
    }

    /// Asks the token server for a pull token, with the credential if any:
    /// Basic for username/password, the OAuth2 refresh flow for identity tokens.
    async fn fetch_token(
        &self,
        target: &Target<'_>,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<String, RegistryError> {
        let registry = target.registry;
        let realm_url = url::Url::parse(realm).map_err(|_| RegistryError::InvalidResponse {
            registry: registry.to_string(),
            detail: "the token realm in WWW-Authenticate is not a URL".into(),
        })?;
        let realm_host = realm_url.host_str().unwrap_or_default().to_string();
        let realm_authority = match realm_url.port() {
            Some(p) => format!("{realm_host}:{p}"),
            None => realm_host.clone(),
        };
        match realm_url.scheme() {
            "https" => {}
            "http" if self.is_insecure(&realm_authority) || target.credential.is_none() => {}
            _ => {
                return Err(RegistryError::Unauthorized {
                    registry: registry.to_string(),
                    detail: format!(
                        "the token realm {realm_authority} is not HTTPS (nor an --insecure-registry host); refusing to send credentials there"
                    ),
                });
            }
        }
        let mut query: Vec<(&str, &str)> = vec![("scope", scope)];
        if let Some(service) = service {
            query.push(("service", service));
        }
        let request = match target.credential {
            Some(Credential::IdentityToken { token, .. }) => {
                let mut form = vec![
                    ("grant_type", "refresh_token"),
                    ("refresh_token", token.expose()),
                    ("client_id", "fn-image-resolver"),
                ];
                form.extend(query.iter().copied());
                self.token.post(realm_url.clone()).form(&form)
            }
            Some(cred @ Credential::Basic { .. }) => {
                let mut req = self.token.get(realm_url.clone()).query(&query);
                if let Some(basic) = cred.basic_header() {
                    req = req.header(header::AUTHORIZATION, basic);
                }
                req
            }
            None => self.token.get(realm_url.clone()).query(&query),
        };
        let started = Instant::now();
        let result = request.send().await;
        self.observe(
            registry,
            RequestKind::Token,
            result.as_ref().ok().map(|r| r.status().as_u16()),
            started,
        );
        let resp =
            result.map_err(
                |e| match classify(e, &realm_authority, self.request_timeout) {
                    Attempt::Tls(detail) => RegistryError::Tls {
                        registry: registry.to_string(),
                        detail: format!("token server {realm_authority}: {detail}"),
                    },
                    Attempt::Failed(RegistryError::Unreachable { detail, .. }) => {
                        RegistryError::Unreachable {
                            registry: registry.to_string(),
                            detail: format!("token server {realm_authority}: {detail}"),
                        }
                    }
                    Attempt::Failed(other) => other,
                },
            )?;
        let what = format!("a token for {scope}");
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(RegistryError::Unauthorized {
                registry: registry.to_string(),
                detail: format!(
                    "token server {realm_authority} answered HTTP {} for {what}{}",
                    status.as_u16(),
                    if target.credential.is_some() {
                        " (credentials rejected)"
                    } else {
                        " (no credentials configured for this registry)"
                    }
                ),
            });
        }
        let resp = check_status(resp, target, &what).await?;
        let body = read_limited(resp, MAX_SMALL_BODY, self.request_timeout, target, &what).await?;
        let parsed: TokenResponse =
            serde_json::from_slice(&body).map_err(|_| RegistryError::InvalidResponse {
                registry: registry.to_string(),
                detail: format!("token server {realm_authority} did not answer with a token"),
            })?;
        let token =
            parsed
                .into_token(Instant::now())
                .ok_or_else(|| RegistryError::InvalidResponse {
                    registry: registry.to_string(),
                    detail: format!("token server {realm_authority} answered without a token"),
                })?;
        let value = token.value.expose().to_string();
        self.auth.store_token(
            target.host,
            scope,
            target.credential.map(Credential::identity),
            token,
        );
        Ok(value)
    }

    fn observe(&self, registry: &str, kind: RequestKind, status: Option<u16>, started: Instant) {
        if let Some(o) = &self.observer {
            o.observe(registry, kind, status, started.elapsed());
        }
    }
}

/// Follows at most five redirects and never from HTTPS down to plain HTTP.
/// (reqwest already drops `Authorization` when a redirect changes host.)
fn redirect_policy() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let downgrade = attempt.url().scheme() == "http"
            && attempt.previous().iter().any(|u| u.scheme() == "https");
        if downgrade {
            attempt.error("refusing a redirect from HTTPS to plain HTTP")
        } else if attempt.previous().len() >= 5 {
            attempt.error("too many redirects")
        } else {
            attempt.follow()
        }
    })
}

fn classify(error: reqwest::Error, registry: &str, timeout: Duration) -> Attempt {
    if let Some(tls) = find_rustls_error(&error) {
        return Attempt::Tls(tls);
    }
    if error.is_timeout() {
        return Attempt::Failed(RegistryError::Timeout {
            registry: registry.to_string(),
            after: timeout,
        });
    }
    Attempt::Failed(RegistryError::Unreachable {
        registry: registry.to_string(),
        detail: root_cause(&error),
    })
}

/// Walks the source chain for a rustls error. hyper nests it in io::Errors
/// whose `source()` skips the wrapped error, so those are opened explicitly.
fn find_rustls_error(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
        {
            let inner: &(dyn std::error::Error + 'static) = inner;
            return find_rustls_error(inner);
        }
        current = e.source();
    }
    None
}

/// The innermost cause ("Connection refused (os error 111)"): short and free
/// of URLs and headers.
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

fn header_str(resp: &reqwest::Response, name: impl header::AsHeaderName) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    #[serde(default)]
    errors: Vec<ErrorEntry>,
}

#[derive(Deserialize)]
struct ErrorEntry {
    #[serde(default)]
    code: String,
}

/// Turns a non-2xx response into a typed error. Only the registry's error
/// *code* is kept; messages and details could echo request data.
async fn check_status(
    resp: reqwest::Response,
    target: &Target<'_>,
    what: &str,
) -> Result<reqwest::Response, RegistryError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let registry = target.registry.to_string();
    let retry_after = resp
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let code = read_limited(resp, MAX_SMALL_BODY, Duration::ZERO, target, what)
        .await
        .ok()
        .and_then(|b| serde_json::from_slice::<ErrorEnvelope>(&b).ok())
        .and_then(|env| env.errors.into_iter().next())
        .map(|e| e.code)
        .filter(|c| {
            !c.is_empty()
                && c.len() < 64
                && c.chars().all(|ch| ch.is_ascii_uppercase() || ch == '_')
        });
    Err(match status {
        StatusCode::NOT_FOUND => RegistryError::NotFound {
            registry,
            what: what.to_string(),
            code: code.unwrap_or_else(|| "HTTP 404".into()),
        },
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => RegistryError::Unauthorized {
            registry,
            detail: format!(
                "HTTP {} for {what}{}{}",
                status.as_u16(),
                code.map(|c| format!(" ({c})")).unwrap_or_default(),
                if target.credential.is_some() {
                    "; the configured credentials were not accepted"
                } else {
                    "; no credentials are configured for this registry"
                }
            ),
        },
        StatusCode::TOO_MANY_REQUESTS => RegistryError::RateLimited {
            registry,
            retry_after,
        },
        _ => RegistryError::Status {
            registry,
            what: what.to_string(),
            status: status.as_u16(),
        },
    })
}

/// Reads a body, failing as soon as it exceeds `limit` bytes.
async fn read_limited(
    mut resp: reqwest::Response,
    limit: usize,
    timeout: Duration,
    target: &Target<'_>,
    what: &str,
) -> Result<Vec<u8>, RegistryError> {
    let too_big = || RegistryError::InvalidResponse {
        registry: target.registry.to_string(),
        detail: format!("{what} is larger than the {limit}-byte limit"),
    };
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(too_big());
    }
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > limit {
                    return Err(too_big());
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => {
                return Err(match classify(e, target.registry, timeout) {
                    Attempt::Tls(detail) => RegistryError::Tls {
                        registry: target.registry.to_string(),
                        detail,
                    },
                    Attempt::Failed(e) => e,
                });
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
