//! Image reference → digest and entrypoint, from the registry.

pub mod challenge;
pub mod client;
pub mod docker_config;
pub mod error;
pub mod grammar;
pub mod hosts;
pub mod manifest;
pub mod reference;
pub mod tls;
pub mod tokens;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use std::time::Duration;

use serde::Serialize;
use tracing::{debug, info, warn};

use self::client::{ClientOptions, Endpoint, RegistryClient, RequestObserver, Target};
pub use self::docker_config::{
    Credential, CredentialId, DockerConfig, DockerConfigError, KeyedCredential,
};
pub use self::error::{ErrorKind, RegistryError, ResolveError};
pub use self::manifest::{Digest, Platform, PlatformError};
use self::manifest::{
    ManifestKind, candidates, offered, parse_config, parse_manifest, verify_digest,
};
pub use self::reference::ImageRef;
use self::tls::TlsError;

/// Most bytes of arguments (Entrypoint and Cmd together) an image may
/// have: more is refused as `unsupported-image`, definitively.
pub const MAX_ARGUMENT_BYTES: usize = 64 * 1024;

/// Deepest nesting of indexes followed (the OCI image spec allows an index
/// in an index; containerd descends them).
const MAX_INDEX_DEPTH: usize = 4;

/// Everything the resolver needs to know, independent of how it was configured.
#[derive(Debug, Clone)]
pub struct ResolverSettings {
    /// Prefix for bare function names (`set-namespace:v0.4`).
    pub default_prefix: String,
    pub platform: Platform,
    /// Seed: credentials and pull secrets are only used when this is on.
    pub private_registries: bool,
    pub docker_config_path: PathBuf,
    pub pull_secret_name: String,
    /// Directory with `ca.crt`/`ca.pem`, when private-registry TLS is on.
    pub tls_ca_dir: Option<PathBuf>,
    pub insecure_hosts: Vec<String>,
    /// Limit for one HTTP exchange with a registry.
    pub request_timeout: Duration,
    /// Limit for a whole resolution (all its requests).
    pub resolve_timeout: Duration,
    /// Most resolutions (or revalidations) in flight at once.
    pub max_concurrent_fetches: usize,
    /// containerd's registry host configuration (`config_path`): where
    /// each registry's `hosts.toml` sends its requests.
    pub registry_config_path: Option<PathBuf>,
    /// A Docker config or CA file that is not there yet is waited for
    /// (`serve`, whose Secret volumes are optional) rather than an error
    /// (`resolve`, where the user named the file).
    pub wait_for_files: bool,
}

/// The readiness check of the mounted Docker config and registry CA.
pub const PRIVATE_REGISTRIES_CHECK: &str = "private-registries";

/// A mounted file that could not be taken up while running (the last good
/// one stays in use).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot build the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
}

/// Configuration problems found at startup; each names the file or flag.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    DockerConfig(#[from] DockerConfigError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot build the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
}

/// What the registry said about one image (credential-free): what a fetch
/// returns and a cache entry keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// Digest to pin: the index digest for multi-platform images.
    pub digest: Digest,
    /// `Config.Entrypoint` as in the image. Boxed slices, held at their
    /// length: a list read from JSON keeps room for four, and a cache
    /// keeps thousands of these.
    pub config_entrypoint: Box<[String]>,
    /// `Config.Cmd` as in the image.
    pub cmd: Box<[String]>,
    /// Platform of the config that was read, when it is not the one asked
    /// for (rare, so boxed: a cache entry keeps this struct).
    pub platform: Option<Box<Platform>>,
}

/// One resolved image as a pod's patch or an endpoint answer needs it,
/// borrowed from a cache entry (or a fetch), so a cache hit copies nothing.
#[derive(Debug, Clone, Copy)]
pub struct ImageAnswer<'a> {
    pub reference: &'a ImageRef,
    pub info: &'a ImageInfo,
    /// Pods need the mirrored pull secret for this image.
    pub needs_pull_secret: bool,
}

impl<'a> ImageAnswer<'a> {
    pub fn new(reference: &'a ImageRef, info: &'a ImageInfo, needs_pull_secret: bool) -> Self {
        Self {
            reference,
            info,
            needs_pull_secret,
        }
    }

    /// Digest to pin: the index digest for multi-platform images.
    pub fn digest(&self) -> &'a Digest {
        &self.info.digest
    }

    /// The reference pinned to the digest (tag kept).
    pub fn pinned(&self) -> String {
        self.reference.pinned(&self.info.digest)
    }

    /// The seed's entrypoint: `Config.Entrypoint`, else `Config.Cmd`.
    pub fn entrypoint(&self) -> &'a [String] {
        if self.info.config_entrypoint.is_empty() {
            &self.info.cmd
        } else {
            &self.info.config_entrypoint
        }
    }

    /// `Config.Entrypoint` as in the image.
    pub fn config_entrypoint(&self) -> &'a [String] {
        &self.info.config_entrypoint
    }

    /// `Config.Cmd` as in the image.
    pub fn cmd(&self) -> &'a [String] {
        &self.info.cmd
    }

    /// Platform of the config that was read, when it is not the one asked for.
    pub fn platform(&self) -> Option<&'a Platform> {
        self.info.platform.as_deref()
    }
}

/// One resolved image, as printed by `resolve` and served by the endpoint.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Resolution {
    /// The image as given.
    pub image: String,
    /// Normalized reference.
    pub reference: String,
    pub digest: String,
    /// The reference pinned to `digest` (tag kept).
    pub pinned: String,
    /// Seed rule: `Config.Entrypoint`, or `Config.Cmd` when that is empty.
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `Config.Entrypoint` exactly as in the image.
    pub config_entrypoint: Vec<String>,
    pub platform: String,
    pub registry: String,
    /// The pull secret pods need for this image, if any.
    pub pull_secret: Option<String>,
}

impl Resolution {
    /// `answer` for `image` as asked for on `platform`.
    pub fn new(
        image: &str,
        answer: &ImageAnswer<'_>,
        platform: &Platform,
        pull_secret: Option<&str>,
    ) -> Self {
        let digest = answer.digest().to_string();
        Self {
            image: image.to_string(),
            reference: answer.reference.to_string(),
            pinned: answer.reference.pinned(&digest),
            digest,
            entrypoint: answer.entrypoint().to_vec(),
            cmd: answer.cmd().to_vec(),
            config_entrypoint: answer.config_entrypoint().to_vec(),
            platform: answer.platform().unwrap_or(platform).to_string(),
            registry: answer.reference.registry().to_string(),
            pull_secret: pull_secret.map(str::to_string),
        }
    }
}

/// The Docker config in use, swappable when the mounted file changes.
#[derive(Debug)]
pub struct Credentials {
    path: Option<PathBuf>,
    /// Read on every resolve, replaced whole on reload.
    current: ArcSwap<DockerConfig>,
    /// No file at `path` yet (a Secret volume marked optional whose Secret
    /// does not exist): no credentials until it appears.
    missing: AtomicBool,
}

impl Credentials {
    /// No credentials at all (private registries disabled).
    pub fn none() -> Self {
        Self {
            path: None,
            current: ArcSwap::from_pointee(DockerConfig::default()),
            missing: AtomicBool::new(false),
        }
    }

    /// Reads the Docker config at `path`; a file that is not there is an error.
    pub fn load(path: PathBuf) -> Result<Self, DockerConfigError> {
        let config = DockerConfig::load(&path)?;
        warn_about(&config, &path);
        Ok(Self {
            path: Some(path),
            current: ArcSwap::from_pointee(config),
            missing: AtomicBool::new(false),
        })
    }

    /// The same, except that a file that is not there yet means no
    /// credentials until [`Credentials::reload`] finds it (what a
    /// long-running process does with an optional Secret volume).
    pub fn load_or_wait(path: PathBuf) -> Result<Self, DockerConfigError> {
        match Self::load(path.clone()) {
            Err(DockerConfigError::Read { source, .. }) if is_not_found(&source) => {
                warn!(path = %path.display(), "no Docker config: private registries are off until the file appears");
                Ok(Self {
                    path: Some(path),
                    current: ArcSwap::from_pointee(DockerConfig::default()),
                    missing: AtomicBool::new(true),
                })
            }
            other => other,
        }
    }

    /// Whether the file was not there at the last read.
    pub fn is_missing(&self) -> bool {
        self.missing.load(Ordering::Acquire)
    }

    /// The file the credentials come from (`None`: private registries off).
    pub fn path(&self) -> Option<&std::path::Path> {
        self.path.as_deref()
    }

    pub fn current(&self) -> Arc<DockerConfig> {
        self.current.load_full()
    }

    /// Re-reads the file. A broken file keeps the last good config in use.
    /// Returns whether the credentials changed.
    pub fn reload(&self) -> Result<bool, DockerConfigError> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        let config = match DockerConfig::load(path) {
            // Still not there: nothing to say again.
            Err(DockerConfigError::Read { source, .. })
                if is_not_found(&source) && self.is_missing() =>
            {
                return Ok(false);
            }
            other => other?,
        };
        if self.missing.swap(false, Ordering::AcqRel) {
            info!(path = %path.display(), "Docker config appeared: private registries are on");
        }
        // Only the watcher task reloads, so compare-then-store does not race.
        if **self.current.load() == config {
            return Ok(false);
        }
        warn_about(&config, path);
        info!(path = %path.display(), registries = config.registries().count(), "Docker config reloaded");
        self.current.store(Arc::new(config));
        Ok(true)
    }
}

fn is_not_found(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound
}

fn warn_about(config: &DockerConfig, path: &std::path::Path) {
    for duplicate in config.duplicates() {
        warn!(
            path = %path.display(),
            registry = %duplicate.registry,
            used = %duplicate.used,
            ignored = %duplicate.ignored,
            "two keys of the Docker config name one registry; using the one the Docker CLI would"
        );
    }
    if config.ignored_helpers {
        warn!(path = %path.display(), "Docker config names credsStore/credHelpers; those are ignored, only \"auths\" is used");
    }
}

/// Resolves image references against registries. Share it behind an `Arc`.
#[derive(Debug)]
pub struct Resolver {
    client: RegistryClient,
    credentials: Arc<Credentials>,
    /// `--tls-secret-path` when private-registry TLS is on, with the CA
    /// file's bytes last loaded from it (`None`: no CA file there yet).
    mounted_ca: Option<(PathBuf, Mutex<Option<Vec<u8>>>)>,
    /// Registries' host configuration, when `--registry-config-path` is set.
    hosts: Option<HostsCache>,
    default_prefix: String,
    platform: Platform,
    private_registries: bool,
    pull_secret_name: String,
    resolve_timeout: Duration,
    /// One permit per resolution talking to a registry.
    fetches: tokio::sync::Semaphore,
    max_fetches: usize,
}

impl Resolver {
    pub fn new(settings: &ResolverSettings) -> Result<Self, SetupError> {
        Self::with_observer(settings, None)
    }

    pub fn with_observer(
        settings: &ResolverSettings,
        observer: Option<Arc<dyn RequestObserver>>,
    ) -> Result<Self, SetupError> {
        let credentials = match (settings.private_registries, settings.wait_for_files) {
            (false, _) => Credentials::none(),
            (true, false) => Credentials::load(settings.docker_config_path.clone())?,
            (true, true) => Credentials::load_or_wait(settings.docker_config_path.clone())?,
        };
        let (mounted_ca, ca_state) = match &settings.tls_ca_dir {
            Some(dir) => match tls::load_ca_dir(dir) {
                Ok((path, roots, pem)) => {
                    info!(path = %path.display(), certificates = roots.len(), "loaded registry CA");
                    (Some(roots), Some((dir.clone(), Mutex::new(Some(pem)))))
                }
                Err(TlsError::NoCaFile { .. }) if settings.wait_for_files => {
                    warn!(dir = %dir.display(), "no registry CA file: registries are verified with the system roots until it appears");
                    (None, Some((dir.clone(), Mutex::new(None))))
                }
                Err(e) => return Err(e.into()),
            },
            None => (None, None),
        };
        let system_roots = match tls::system_roots() {
            Ok(roots) => Some(roots),
            Err(e) => {
                warn!(error = %e, "no system root certificates; only the mounted CA can verify registries");
                None
            }
        };
        let mut client = RegistryClient::new(ClientOptions {
            mounted_ca,
            system_roots,
            insecure_hosts: settings
                .insecure_hosts
                .iter()
                .cloned()
                .collect::<HashSet<_>>(),
            request_timeout: settings.request_timeout,
            ..ClientOptions::default()
        })?;
        if let Some(observer) = observer {
            client = client.with_observer(observer);
        }
        let mut default_prefix = settings.default_prefix.trim_end_matches('/').to_string();
        if !default_prefix.is_empty() {
            default_prefix.push('/');
        }
        let max_fetches = settings.max_concurrent_fetches.max(1);
        Ok(Self {
            client,
            credentials: Arc::new(credentials),
            mounted_ca: ca_state,
            hosts: settings
                .registry_config_path
                .clone()
                .map(|root| HostsCache {
                    root,
                    loaded: quick_cache::sync::Cache::new(1024),
                }),
            default_prefix,
            platform: settings.platform.clone(),
            private_registries: settings.private_registries,
            pull_secret_name: settings.pull_secret_name.clone(),
            resolve_timeout: settings.resolve_timeout,
            fetches: tokio::sync::Semaphore::new(max_fetches),
            max_fetches,
        })
    }

    /// The registries this resolver is set up for: the default prefix's and
    /// those of the Docker config in use (normalized hosts).
    pub fn configured_registries(&self) -> Vec<String> {
        let mut hosts: Vec<String> = self
            .credentials
            .current()
            .registries()
            .map(str::to_string)
            .collect();
        if let Ok(reference) = self.parse("fn") {
            hosts.push(reference.registry().to_string());
        }
        hosts
    }

    /// Most resolutions talking to registries at once (`--max-concurrent-fetches`).
    pub fn max_concurrent_fetches(&self) -> usize {
        self.max_fetches
    }

    pub fn credentials(&self) -> &Arc<Credentials> {
        &self.credentials
    }

    /// The directory of the registry CA (`--tls-secret-path`), when
    /// private-registry TLS is on.
    pub fn mounted_ca_dir(&self) -> Option<&Path> {
        self.mounted_ca.as_ref().map(|(dir, _)| dir.as_path())
    }

    /// Re-reads the registry CA; from now on the ladder trusts what the file
    /// holds. A file that disappears keeps the last CA (as a broken one
    /// does). Returns whether what is trusted changed.
    pub fn reload_ca(&self) -> Result<bool, ReloadError> {
        let Some((dir, loaded)) = &self.mounted_ca else {
            return Ok(false);
        };
        let mut loaded = loaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (path, roots, pem) = match tls::load_ca_dir(dir) {
            Ok(found) => found,
            Err(TlsError::NoCaFile { .. }) if loaded.is_none() => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        if loaded.as_deref() == Some(pem.as_slice()) {
            return Ok(false);
        }
        self.client.set_mounted_ca(Some(&roots))?;
        info!(path = %path.display(), certificates = roots.len(), "registry CA loaded: the ladder starts with it");
        *loaded = Some(pem);
        Ok(true)
    }

    /// Reports [`Resolver::private_registry_gaps`] as the readiness check
    /// [`PRIVATE_REGISTRIES_CHECK`]: degraded while something is missing.
    pub fn report_readiness(&self, readiness: &crate::health::Readiness) {
        let gaps = self.private_registry_gaps();
        readiness.set(
            PRIVATE_REGISTRIES_CHECK,
            if gaps.is_empty() {
                crate::health::Check::Ready
            } else {
                crate::health::Check::Degraded(gaps.join("; "))
            },
        );
    }

    /// What private registries lack for now, one sentence each (empty:
    /// nothing): a Docker config or a registry CA that a mounted Secret
    /// should hold but does not yet. For readiness: the webhook serves
    /// meanwhile, pinning what it can reach.
    pub fn private_registry_gaps(&self) -> Vec<String> {
        let mut gaps = Vec::new();
        if let Some(path) = self.credentials.path()
            && self.credentials.is_missing()
        {
            gaps.push(format!(
                "no Docker config at {} (--registry-auth-secret-path): private registries are off until the file appears",
                path.display()
            ));
        }
        if let Some((dir, loaded)) = &self.mounted_ca
            && loaded
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .is_none()
        {
            gaps.push(format!(
                "no {} in {} (--tls-secret-path): registries are verified with the system roots until it appears",
                tls::CA_FILE_NAMES.join(" or "),
                dir.display()
            ));
        }
        gaps
    }

    pub fn default_platform(&self) -> &Platform {
        &self.platform
    }

    /// Parses `image` as `resolve` and `/v1/resolve` take it: a bare name
    /// (`set-namespace:v0.4`) is a catalog function and gets the default
    /// prefix, as the function runner does.
    pub fn parse(&self, image: &str) -> Result<ImageRef, ResolveError> {
        Self::parse_with(image, &self.default_prefix)
    }

    /// Parses `image` as a pod names it, the kubelet's way: no registry host
    /// means Docker Hub (`busybox` is `docker.io/library/busybox:latest`).
    pub fn parse_pod_image(&self, image: &str) -> Result<ImageRef, ResolveError> {
        Self::parse_with(image, "")
    }

    fn parse_with(image: &str, prefix: &str) -> Result<ImageRef, ResolveError> {
        ImageRef::parse(image, prefix).map_err(|e| ResolveError::InvalidReference {
            image: image.to_string(),
            reason: e.reason,
        })
    }

    /// Is the image from the default function catalog? Seed: those always use
    /// default (anonymous) access and need no pull secret.
    pub fn is_default_catalog(&self, reference: &ImageRef) -> bool {
        // `default_prefix` ends in '/': the name is the prefix's repository
        // or below it. No allocation: this runs on every cache hit.
        let prefix = self.default_prefix.trim_end_matches('/');
        let name = reference.name();
        !prefix.is_empty()
            && name.starts_with(prefix)
            && matches!(name.as_bytes().get(prefix.len()), None | Some(b'/'))
    }

    /// The credential to use for `reference`, per the seed's decision tree.
    pub fn credential_for(&self, reference: &ImageRef) -> Option<Arc<KeyedCredential>> {
        if !self.private_registries || self.is_default_catalog(reference) {
            return None;
        }
        self.credentials
            .current
            .load()
            .get_keyed(reference.registry())
    }

    /// The pull secret a pod needs for this image, if any.
    pub fn pull_secret_for<C>(&self, credential: Option<C>) -> Option<&str> {
        credential.map(|_| self.pull_secret_name.as_str())
    }

    /// Resolves one image without any cache.
    pub async fn resolve(
        &self,
        image: &str,
        platform: Option<&Platform>,
    ) -> Result<Resolution, ResolveError> {
        let reference = self.parse(image)?;
        let platform = platform.unwrap_or(&self.platform);
        let credential = self.credential_for(&reference);
        let info = self
            .fetch(
                &reference,
                platform,
                credential.as_deref().map(|k| &k.credential),
            )
            .await
            .map_err(|source| ResolveError::Registry {
                image: image.to_string(),
                source,
            })?;
        let pull_secret = self.pull_secret_for(credential.as_ref());
        let answer = ImageAnswer::new(&reference, &info, pull_secret.is_some());
        Ok(Resolution::new(image, &answer, platform, pull_secret))
    }

    /// Reads digest, entrypoint and cmd from the registry, within the
    /// resolve timeout. Costs one manifest GET and one config GET (plus the
    /// platform manifest for an index, and a token when the registry wants
    /// one), from the hosts its hosts.toml names when it has one.
    pub async fn fetch(
        &self,
        reference: &ImageRef,
        platform: &Platform,
        credential: Option<&Credential>,
    ) -> Result<ImageInfo, RegistryError> {
        let target = target(reference, credential);
        self.within_deadline(reference, async {
            let route = self.route(reference)?;
            self.fetch_inner(reference, &route, &target, platform).await
        })
        .await
    }

    /// The digest a tag points to now (a HEAD), for revalidating cached answers.
    pub async fn current_digest(
        &self,
        reference: &ImageRef,
        credential: Option<&Credential>,
    ) -> Result<Option<String>, RegistryError> {
        let target = target(reference, credential);
        self.within_deadline(reference, async {
            let route = self.route(reference)?;
            match self
                .routed(
                    &route,
                    &target,
                    Request::Head(reference.manifest_reference()),
                    Hosts::Resolve,
                )
                .await?
            {
                Fetched::Digest(digest) => Ok(digest),
                _ => unreachable!("a HEAD gives a digest"),
            }
        })
        .await
    }

    /// Where `reference`'s requests go: its registry's hosts.toml when it
    /// has one (read again when one of its files changed), else the
    /// registry itself.
    fn route(&self, reference: &ImageRef) -> Result<Route, RegistryError> {
        let Some(cache) = &self.hosts else {
            return Ok(Route::Direct);
        };
        let registry = reference.registry();
        if let Some(loaded) = cache.loaded.get(registry)
            && !hosts::changed(&loaded.stamp)
        {
            return loaded.route.clone();
        }
        let (stamp, route) = match hosts::load(&cache.root, registry) {
            Ok(read) => {
                let route = match read.hosts {
                    None => Ok(Route::Direct),
                    Some(specs) => specs
                        .iter()
                        .map(|spec| self.client.endpoint(spec, registry))
                        .collect::<Result<Vec<_>, _>>()
                        .map(|endpoints| Route::Hosts(endpoints.into())),
                };
                match &route {
                    Ok(Route::Hosts(endpoints)) => {
                        let hosts: Vec<&str> =
                            endpoints.iter().map(|e| e.authority.as_str()).collect();
                        info!(
                            registry,
                            ?hosts,
                            "registry host configuration (hosts.toml) loaded"
                        );
                    }
                    Ok(Route::Direct) => {}
                    Err(e) => warn!(registry, error = %e, "registry host configuration unusable"),
                }
                (read.stamp, route)
            }
            // Looked at again at the next request.
            Err(e) => (
                Vec::new(),
                Err(RegistryError::Tls {
                    registry: registry.to_string(),
                    detail: e.to_string(),
                }),
            ),
        };
        let loaded = Arc::new(LoadedRoute { stamp, route });
        if !loaded.stamp.is_empty() {
            cache.loaded.insert(registry.to_string(), loaded.clone());
        }
        loaded.route.clone()
    }

    /// Sends `request` to the registry itself, or across the hosts of its
    /// hosts.toml as containerd does: a tag is resolved on the hosts that
    /// may `resolve` (and `pull`), a digest reference on those that may
    /// `pull`, each moving on to the next host on any error; content by
    /// digest (child manifests, config blobs) is fetched from every host in
    /// order (containerd 1.6.20 and 2.x alike: the `pull` capability only
    /// says whether any fetch is made). All failing: the first error that
    /// was not a 404, else not found.
    async fn routed(
        &self,
        route: &Route,
        target: &Target<'_>,
        request: Request<'_>,
        which: Hosts,
    ) -> Result<Fetched, RegistryError> {
        let Route::Hosts(endpoints) = route else {
            return self.send(target, request).await;
        };
        let candidates: Vec<&Endpoint> = endpoints
            .iter()
            .filter(|e| match which {
                Hosts::Resolve => e.pull && e.resolve,
                Hosts::Pull => e.pull,
                Hosts::All => true,
            })
            .collect();
        let mut first_error = None;
        let mut not_found = None;
        for (i, endpoint) in candidates.iter().enumerate() {
            // The pod's credential goes to whichever host challenges, as the
            // node's does: the kubelet hands containerd the credential
            // without a server address, so containerd's CRI offers it to
            // every host of the registry's hosts.toml.
            let via = Target {
                host: &endpoint.authority,
                endpoint: Some(endpoint),
                ..*target
            };
            match self.send(&via, request).await {
                Ok(fetched) => {
                    if i > 0 || !endpoint.is_registry() {
                        debug!(registry = target.registry, host = %endpoint.authority, "answered by a host of hosts.toml");
                    }
                    return Ok(fetched);
                }
                Err(e @ RegistryError::NotFound { .. }) if which != Hosts::All => {
                    not_found.get_or_insert(e);
                }
                Err(e) => {
                    debug!(registry = target.registry, host = %endpoint.authority, error = %e, "trying the next host of hosts.toml");
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error
            .or(not_found)
            .unwrap_or_else(|| RegistryError::NotFound {
                registry: target.registry.to_string(),
                what: format!(
                    "{} (hosts.toml names no host that may {})",
                    request.what(),
                    which.as_str()
                ),
                code: "NO_HOSTS".into(),
            }))
    }

    /// One request to one host.
    async fn send(
        &self,
        target: &Target<'_>,
        request: Request<'_>,
    ) -> Result<Fetched, RegistryError> {
        Ok(match request {
            Request::Manifest(reference) => {
                Fetched::Manifest(self.client.get_manifest(target, reference).await?)
            }
            Request::Head(reference) => {
                Fetched::Digest(self.client.head_manifest(target, reference).await?)
            }
            Request::Blob(digest) => {
                Fetched::Blob(self.client.get_config_blob(target, digest).await?)
            }
        })
    }

    async fn manifest(
        &self,
        route: &Route,
        target: &Target<'_>,
        reference: &str,
        which: Hosts,
    ) -> Result<client::Manifest, RegistryError> {
        match self
            .routed(route, target, Request::Manifest(reference), which)
            .await?
        {
            Fetched::Manifest(m) => Ok(m),
            _ => unreachable!("a manifest request gives a manifest"),
        }
    }

    /// Runs `work` within the resolve timeout; running out is a Timeout.
    /// Runs `work` once a fetch permit is free; waiting for it counts
    /// against the same deadline.
    async fn within_deadline<T>(
        &self,
        reference: &ImageRef,
        work: impl std::future::Future<Output = Result<T, RegistryError>>,
    ) -> Result<T, RegistryError> {
        let limited = async {
            // The semaphore is never closed, so acquire cannot fail.
            let _permit = self.fetches.acquire().await;
            work.await
        };
        tokio::time::timeout(self.resolve_timeout, limited)
            .await
            .unwrap_or_else(|_| {
                Err(RegistryError::Timeout {
                    registry: reference.registry().to_string(),
                    after: self.resolve_timeout,
                })
            })
    }

    async fn fetch_inner(
        &self,
        reference: &ImageRef,
        route: &Route,
        target: &Target<'_>,
        platform: &Platform,
    ) -> Result<ImageInfo, RegistryError> {
        let invalid = |detail: String| RegistryError::InvalidResponse {
            registry: reference.registry().to_string(),
            detail,
        };
        let top = self
            .manifest(
                route,
                target,
                reference.manifest_reference(),
                if reference.digest().is_some() {
                    Hosts::Pull
                } else {
                    Hosts::Resolve
                },
            )
            .await?;
        // Pin what we verified ourselves: the digest asked for, or the hash of
        // the bytes served. A registry whose header disagrees is lying.
        let digest = match reference.digest() {
            Some(expected) => {
                verify_digest(expected, &top.body).map_err(|e| invalid(format!("manifest {e}")))?;
                expected.to_string()
            }
            None => {
                let computed = manifest::digest_of("sha256", &top.body).unwrap_or_default();
                if let Some(header) = &top.digest_header
                    && header.starts_with("sha256:")
                    && !header.eq_ignore_ascii_case(&computed)
                {
                    return Err(invalid(format!(
                        "manifest digest header {header} does not match the content ({computed})"
                    )));
                }
                computed
            }
        };
        let unsupported = |detail: String| RegistryError::UnsupportedImage {
            registry: reference.registry().to_string(),
            detail,
        };
        // Down the indexes as containerd goes: at each, the first candidate
        // only (see `manifest::candidates`); the digest pinned stays the
        // top-level one, the entrypoint is the chosen image's.
        let mut body = top;
        let mut depth = 0;
        // Set when the image was chosen through an entry without a
        // platform: then its config must say the platform asked for.
        let mut unchecked: Option<Vec<String>> = None;
        let config = loop {
            let kind = parse_manifest(&body.body, body.content_type.as_deref())
                .map_err(|e| unsupported(e.0))?;
            let manifests = match kind {
                ManifestKind::Image { config } => break config,
                ManifestKind::Index { manifests } => manifests,
            };
            depth += 1;
            if depth > MAX_INDEX_DEPTH {
                return Err(unsupported(format!(
                    "its indexes nest deeper than {MAX_INDEX_DEPTH}"
                )));
            }
            let Some(entry) = candidates(&manifests, platform).into_iter().next() else {
                return Err(RegistryError::PlatformNotFound {
                    wanted: platform.to_string(),
                    available: offered(&manifests),
                });
            };
            unchecked = entry.platform.is_none().then(|| offered(&manifests));
            let child = self
                .manifest(route, target, &entry.digest, Hosts::All)
                .await?;
            verify_digest(&entry.digest, &child.body)
                .map_err(|e| invalid(format!("platform manifest {e}")))?;
            body = child;
        };
        let blob = match self
            .routed(route, target, Request::Blob(&config.digest), Hosts::All)
            .await?
        {
            Fetched::Blob(blob) => blob,
            _ => unreachable!("a blob request gives a blob"),
        };
        verify_digest(&config.digest, &blob).map_err(|e| invalid(format!("config blob {e}")))?;
        let parsed = parse_config(&blob).map_err(|e| unsupported(e.0))?;
        if let Some(mut available) = unchecked {
            // containerd runs an image chosen without a platform only if
            // its config's platform is the node's.
            let says = parsed.platform.as_ref();
            if !says.is_some_and(|p| platform.matches(p)) {
                available.push(format!(
                    "its first candidate has no platform and its config says {}",
                    says.map_or_else(|| "none".to_string(), ToString::to_string)
                ));
                return Err(RegistryError::PlatformNotFound {
                    wanted: platform.to_string(),
                    available,
                });
            }
        }
        // No program can be given a NUL (exec takes C strings).
        if parsed
            .entrypoint
            .iter()
            .chain(&parsed.cmd)
            .any(|a| a.contains('\0'))
        {
            return Err(unsupported(
                "the image config's Entrypoint or Cmd holds a NUL character, which no program argument can hold".into(),
            ));
        }
        // What one image may carry into the cache and into pods: Porch's
        // functions have a few short arguments.
        let carried: usize = parsed
            .entrypoint
            .iter()
            .chain(&parsed.cmd)
            .map(String::len)
            .sum();
        if carried > MAX_ARGUMENT_BYTES {
            return Err(unsupported(format!(
                "the image config's Entrypoint and Cmd hold {carried} bytes of arguments, more than the {MAX_ARGUMENT_BYTES} accepted"
            )));
        }
        Ok(ImageInfo {
            digest: Digest::new(&digest),
            config_entrypoint: parsed.entrypoint.into_boxed_slice(),
            cmd: parsed.cmd.into_boxed_slice(),
            platform: parsed.platform.filter(|p| p != platform).map(Box::new),
        })
    }
}

fn target<'a>(reference: &'a ImageRef, credential: Option<&'a Credential>) -> Target<'a> {
    Target {
        host: reference.api_host(),
        registry: reference.registry(),
        repository: reference.repository(),
        credential,
        endpoint: None,
    }
}

/// How one registry's requests go.
#[derive(Debug, Clone)]
enum Route {
    /// No host configuration for it: to the registry itself, today's rules.
    Direct,
    /// The hosts of its hosts.toml, in order.
    Hosts(Arc<[Endpoint]>),
}

/// Host configurations read from `--registry-config-path`, per registry
/// (bounded, like every per-host map).
#[derive(Debug)]
struct HostsCache {
    root: PathBuf,
    loaded: quick_cache::sync::Cache<String, Arc<LoadedRoute>>,
}

#[derive(Debug)]
struct LoadedRoute {
    stamp: Vec<(PathBuf, Option<(std::time::SystemTime, u64)>)>,
    route: Result<Route, RegistryError>,
}

/// Which hosts of a hosts.toml a request may go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hosts {
    /// A tag: hosts that may `resolve` and `pull`.
    Resolve,
    /// A digest reference: hosts that may `pull`.
    Pull,
    /// Content by digest: every host, in order.
    All,
}

impl Hosts {
    fn as_str(self) -> &'static str {
        match self {
            Self::Resolve => "resolve",
            Self::Pull | Self::All => "pull",
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Request<'a> {
    Manifest(&'a str),
    Head(&'a str),
    Blob(&'a str),
}

impl Request<'_> {
    fn what(&self) -> String {
        match self {
            Self::Manifest(r) | Self::Head(r) => format!("manifest {r}"),
            Self::Blob(d) => format!("blob {d}"),
        }
    }
}

enum Fetched {
    Manifest(client::Manifest),
    Digest(Option<String>),
    Blob(Vec<u8>),
}
