//! A small OCI distribution client: just the reads a resolver needs.
//!
//! Written on reqwest instead of using `oci-client` because this product needs
//! what that client keeps to itself: the status and headers of every response
//! (429 `Retry-After`, typed not-found vs unauthorized), one shared client for
//! all credentials, authentication driven by the challenge of the request we
//! actually need (oci-client pings `/v2/` before every first pull of a
//! repository), tokens shared across concurrent requests, Porch's
//! TLS → system roots → plain HTTP ladder per host, and hard size limits on
//! what we read. See docs/development.md, "Design".
//!
//! Here: the client and its three reads; [`transport`] climbs the TLS ladder
//! and answers challenges, [`token`] talks to token servers, [`response`]
//! turns statuses and bodies into typed errors within read limits.

mod endpoint;
mod response;
mod token;
mod transport;

pub use self::endpoint::Endpoint;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use reqwest::{Method, header};
use rustls::RootCertStore;

use self::response::{check_status, header_str, read_limited};
use self::transport::{Rung, redirect_policy};
use super::docker_config::Credential;
use super::error::RegistryError;
use super::reference::normalize_host;
use super::tokens::AuthCache;

/// Every manifest type we understand, so distribution 2.8 never answers 404 for
/// a type we did not ask for.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

const USER_AGENT: &str = concat!("fn-image-resolver/", env!("CARGO_PKG_VERSION"));

/// Most registry hosts whose working rung is remembered.
const MAX_HOSTS: usize = 1024;

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

/// Which repository on which registry, with which credential.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// Host the API is served from (`registry-1.docker.io` for Docker Hub).
    pub host: &'a str,
    /// Normalized registry name, for messages and for `--insecure-registry`.
    pub registry: &'a str,
    pub repository: &'a str,
    pub credential: Option<&'a Credential>,
    /// A host of the registry's hosts.toml to send to; `None`: the
    /// registry itself, up the TLS ladder.
    pub endpoint: Option<&'a Endpoint>,
}

impl Target<'_> {
    /// The host requests go to, as metrics name it: the endpoint's when
    /// there is one (a mirror), else the registry.
    pub fn host_label(&self) -> &str {
        self.endpoint
            .map_or(self.registry, |e| e.authority.as_str())
    }
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

/// The clients that trust the mounted CA, replaced together when it
/// changes (it may appear, or be rotated, while the process runs).
#[derive(Debug)]
struct CaClients {
    mounted_ca: Option<reqwest::Client>,
    /// Trusts mounted CA and system roots: token servers may sit on either.
    token: reqwest::Client,
}

fn build_http(
    roots: RootCertStore,
    redirects: reqwest::redirect::Policy,
    connect_timeout: Duration,
    request_timeout: Duration,
) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .use_preconfigured_tls(super::tls::client_config(roots).as_ref().clone())
        .user_agent(USER_AGENT)
        .connect_timeout(connect_timeout)
        .timeout(request_timeout)
        .pool_idle_timeout(Duration::from_secs(90))
        .redirect(redirects)
        .build()
}

fn ca_clients(
    mounted_ca: Option<&RootCertStore>,
    system_roots: &RootCertStore,
    insecure: &HashSet<String>,
    connect_timeout: Duration,
    request_timeout: Duration,
) -> Result<CaClients, reqwest::Error> {
    let mut combined = system_roots.clone();
    if let Some(ca) = mounted_ca {
        combined.roots.extend(ca.roots.iter().cloned());
    }
    Ok(CaClients {
        mounted_ca: mounted_ca
            .map(|ca| {
                build_http(
                    ca.clone(),
                    redirect_policy(insecure.clone()),
                    connect_timeout,
                    request_timeout,
                )
            })
            .transpose()?,
        // A token request carries the credential itself (Basic, or the
        // refresh token in its body): it follows no redirect at all.
        token: build_http(
            combined,
            reqwest::redirect::Policy::none(),
            connect_timeout,
            request_timeout,
        )?,
    })
}

/// The client. Cheap to share behind an `Arc`; connections are pooled per rung.
#[derive(Debug)]
pub struct RegistryClient {
    ca: ArcSwap<CaClients>,
    system: reqwest::Client,
    system_roots: RootCertStore,
    connect_timeout: Duration,
    insecure: HashSet<String>,
    /// The rung that last worked per host, so the ladder is climbed once.
    /// Bounded like every per-host map: a host named once is not kept forever.
    rungs: quick_cache::sync::Cache<String, Rung>,
    auth: AuthCache,
    max_manifest_bytes: usize,
    max_config_bytes: usize,
    request_timeout: Duration,
    observer: Option<Arc<dyn RequestObserver>>,
}

impl RegistryClient {
    pub fn new(options: ClientOptions) -> Result<Self, reqwest::Error> {
        let insecure: HashSet<String> = options
            .insecure_hosts
            .iter()
            .map(|h| normalize_host(h))
            .collect();
        let system_roots = options
            .system_roots
            .clone()
            .unwrap_or_else(RootCertStore::empty);
        let system = build_http(
            system_roots.clone(),
            redirect_policy(insecure.clone()),
            options.connect_timeout,
            options.request_timeout,
        )?;
        let ca = ca_clients(
            options.mounted_ca.as_ref(),
            &system_roots,
            &insecure,
            options.connect_timeout,
            options.request_timeout,
        )?;
        Ok(Self {
            ca: ArcSwap::from_pointee(ca),
            system,
            system_roots,
            connect_timeout: options.connect_timeout,
            insecure,
            rungs: quick_cache::sync::Cache::new(MAX_HOSTS),
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

    /// Trusts `ca` from now on for the mounted-CA rung and token servers
    /// (`None`: no mounted CA; the ladder starts at the system roots).
    /// Requests in flight finish on the clients they started with.
    pub fn set_mounted_ca(&self, ca: Option<&RootCertStore>) -> Result<(), reqwest::Error> {
        let clients = ca_clients(
            ca,
            &self.system_roots,
            &self.insecure,
            self.connect_timeout,
            self.request_timeout,
        )?;
        self.ca.store(Arc::new(clients));
        // A host's remembered rung may not exist any more (or a better one
        // may): climb the ladder again.
        self.rungs.clear();
        Ok(())
    }

    /// A client with this TLS configuration and the usual settings.
    fn build_client(&self, tls: rustls::ClientConfig) -> Result<reqwest::Client, reqwest::Error> {
        reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .user_agent(USER_AGENT)
            .connect_timeout(self.connect_timeout)
            .timeout(self.request_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .redirect(redirect_policy(self.insecure.clone()))
            .build()
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

    fn observe(&self, registry: &str, kind: RequestKind, status: Option<u16>, started: Instant) {
        if let Some(o) = &self.observer {
            o.observe(registry, kind, status, started.elapsed());
        }
    }
}
