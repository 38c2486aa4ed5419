//! The one resolver cache behind the webhook, the HTTP endpoint and the CLI.
//!
//! Built on moka rather than quick_cache: moka's `try_get_with` runs one
//! loader per key and hands its error to every waiter (quick_cache retries a
//! failed load once per waiter, in turn), and its per-entry `Expiry` gives
//! digest-pinned answers no expiry, tag answers a stale horizon and failures a
//! short life without a sweeper of our own. Its TinyLFU admission keeps a scan
//! of one-off images from flushing the hot function images.
//!
//! Key: normalized reference + platform + credential identity, so two
//! credentials never share an answer. Value: what the registry said and when.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::future::Cache;
use moka::notification::RemovalCause;
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::registry::{
    Credential, CredentialId, ImageInfo, ImageRef, Platform, RegistryError, Resolution,
    ResolveError, Resolver,
};

/// Cache limits and lifetimes.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// Most entries kept (answers and cached failures together).
    pub capacity: u64,
    /// After this, a tag's answer is revalidated (HEAD) in the background.
    pub tag_ttl: Duration,
    /// How long past `tag_ttl` an answer may still be served while the
    /// registry cannot be reached.
    pub max_stale: Duration,
    /// How long a definitive failure (not found, unauthorized) is remembered.
    pub negative_ttl: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            capacity: 10_000,
            tag_ttl: Duration::from_secs(300),
            max_stale: Duration::from_secs(3600),
            negative_ttl: Duration::from_secs(30),
        }
    }
}

/// Where an answer came from (`cached` in the endpoint's JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheStatus {
    /// Fresh from the cache.
    Hit,
    /// Past its TTL: served while it is revalidated, or because the registry
    /// is failing.
    Stale,
    /// Fetched from the registry for this request (or a concurrent one).
    Miss,
}

impl CacheStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Stale => "stale",
            Self::Miss => "miss",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    reference: String,
    platform: Platform,
    credential: Option<CredentialId>,
}

#[derive(Debug)]
struct Entry {
    outcome: Result<ImageInfo, RegistryError>,
    fetched_at: Instant,
    /// Digest-pinned references never change: never revalidated, never expire.
    pinned: bool,
    revalidating: AtomicBool,
}

impl Entry {
    fn new(outcome: Result<ImageInfo, RegistryError>, pinned: bool) -> Arc<Self> {
        Arc::new(Self {
            outcome,
            fetched_at: Instant::now(),
            pinned,
            revalidating: AtomicBool::new(false),
        })
    }
}

/// Per-entry lifetimes: pinned answers live until evicted, tag answers until
/// they are too stale to serve, failures briefly.
struct Lifetimes(CacheSettings);

impl Lifetimes {
    fn of(&self, entry: &Entry) -> Option<Duration> {
        match &entry.outcome {
            Err(_) => Some(self.0.negative_ttl),
            Ok(_) if entry.pinned => None,
            Ok(_) => Some(self.0.tag_ttl + self.0.max_stale),
        }
    }
}

impl Expiry<Key, Arc<Entry>> for Lifetimes {
    fn expire_after_create(
        &self,
        _: &Key,
        value: &Arc<Entry>,
        _: std::time::Instant,
    ) -> Option<Duration> {
        self.of(value)
    }

    fn expire_after_update(
        &self,
        _: &Key,
        value: &Arc<Entry>,
        _: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        self.of(value)
    }
}

/// A [`Resolver`] with the shared cache in front. Cheap to clone.
#[derive(Clone)]
pub struct CachedResolver {
    resolver: Arc<Resolver>,
    cache: Cache<Key, Arc<Entry>>,
    settings: CacheSettings,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for CachedResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedResolver")
            .field("entries", &self.cache.entry_count())
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl CachedResolver {
    pub fn new(resolver: Arc<Resolver>, settings: CacheSettings, metrics: Arc<Metrics>) -> Self {
        let evictions = metrics.clone();
        let cache = Cache::builder()
            .max_capacity(settings.capacity)
            .expire_after(Lifetimes(settings.clone()))
            .support_invalidation_closures()
            .eviction_listener(move |_k, _v, cause| {
                if cause == RemovalCause::Size {
                    evictions.cache_evictions.inc();
                }
            })
            .build();
        Self {
            resolver,
            cache,
            settings,
            metrics,
        }
    }

    pub fn resolver(&self) -> &Arc<Resolver> {
        &self.resolver
    }

    pub fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }

    /// Resolves `image` through the cache.
    pub async fn resolve(
        &self,
        image: &str,
        platform: Option<&Platform>,
    ) -> Result<(Resolution, CacheStatus), ResolveError> {
        let reference = self.resolver.parse(image)?;
        let platform = platform.unwrap_or(self.resolver.default_platform()).clone();
        let credential = self.resolver.credential_for(&reference);
        let (info, status) = self
            .lookup(&reference, &platform, credential.as_ref())
            .await
            .map_err(|source| ResolveError::Registry {
                image: image.to_string(),
                source,
            })?;
        let resolution = Resolution::new(
            image,
            &reference,
            &info,
            &platform,
            self.resolver.pull_secret_for(credential.as_ref()),
        );
        Ok((resolution, status))
    }

    async fn lookup(
        &self,
        reference: &ImageRef,
        platform: &Platform,
        credential: Option<&Credential>,
    ) -> Result<(ImageInfo, CacheStatus), RegistryError> {
        let key = Key {
            reference: reference.to_string(),
            platform: platform.clone(),
            credential: credential.map(Credential::identity),
        };
        if let Some(entry) = self.cache.get(&key).await {
            let age = entry.fetched_at.elapsed();
            match &entry.outcome {
                Err(e) => {
                    self.metrics.cache_lookup("negative");
                    return Err(e.clone());
                }
                Ok(info) if entry.pinned || age < self.settings.tag_ttl => {
                    self.metrics.cache_lookup("hit");
                    return Ok((info.clone(), CacheStatus::Hit));
                }
                Ok(info) if age < self.settings.tag_ttl + self.settings.max_stale => {
                    self.metrics.cache_lookup("stale");
                    self.revalidate_in_background(key, entry.clone(), reference, credential);
                    return Ok((info.clone(), CacheStatus::Stale));
                }
                // Too stale to serve: fetch like a miss.
                Ok(_) => self.cache.invalidate(&key).await,
            }
        }
        self.metrics.cache_lookup("miss");
        let pinned = reference.digest().is_some();
        let resolver = self.resolver.clone();
        let loaded = self
            .cache
            .try_get_with(key, async move {
                match resolver.fetch(reference, platform, credential).await {
                    Ok(info) => Ok(Entry::new(Ok(info), pinned)),
                    // Definitive failures are remembered briefly; transient
                    // ones are only shared with the concurrent waiters.
                    Err(e) if e.kind().is_definitive() => Ok(Entry::new(Err(e), pinned)),
                    Err(e) => Err(e),
                }
            })
            .await;
        match loaded {
            Ok(entry) => match &entry.outcome {
                Ok(info) => Ok((info.clone(), CacheStatus::Miss)),
                Err(e) => Err(e.clone()),
            },
            Err(shared) => Err((*shared).clone()),
        }
    }

    /// Checks a stale tag with a HEAD: same digest keeps the answer (no config
    /// fetch), a new digest fetches the new config, a failing registry keeps
    /// serving the old answer until `max_stale`. One revalidation per entry.
    fn revalidate_in_background(
        &self,
        key: Key,
        entry: Arc<Entry>,
        reference: &ImageRef,
        credential: Option<&Credential>,
    ) {
        if entry.revalidating.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        let reference = reference.clone();
        let credential = credential.cloned();
        tokio::spawn(async move {
            let Ok(old) = &entry.outcome else { return };
            let credential = credential.as_ref();
            let outcome = match this.resolver.current_digest(&reference, credential).await {
                Ok(Some(digest)) if digest == old.digest => {
                    debug!(image = %reference, "tag unchanged");
                    Ok(old.clone())
                }
                Ok(_) => {
                    this.resolver
                        .fetch(&reference, &key.platform, credential)
                        .await
                }
                Err(e) => Err(e),
            };
            match outcome {
                Ok(info) => {
                    if info.digest != old.digest {
                        info!(image = %reference, old = %old.digest, new = %info.digest, "tag moved");
                    }
                    this.metrics.cache_revalidation("refreshed");
                    this.cache.insert(key, Entry::new(Ok(info), false)).await;
                }
                Err(e) if e.kind().is_definitive() => {
                    warn!(image = %reference, error = %e, "cached tag is no longer resolvable");
                    this.metrics.cache_revalidation("gone");
                    this.cache.insert(key, Entry::new(Err(e), false)).await;
                }
                Err(e) => {
                    warn!(image = %reference, error = %e, age_secs = entry.fetched_at.elapsed().as_secs(), "registry failing; serving the cached answer");
                    this.metrics.cache_revalidation("failed");
                    entry.revalidating.store(false, Ordering::Release);
                }
            }
        });
    }

    /// Drops answers fetched with credentials that are no longer configured.
    pub fn retain_credentials(&self, current: &[CredentialId]) {
        let current = current.to_vec();
        let result = self.cache.invalidate_entries_if(move |key, _| {
            key.credential.is_some_and(|id| !current.contains(&id))
        });
        if let Err(e) = result {
            warn!(error = %e, "cannot invalidate cache entries for old credentials");
        }
    }

    /// Applies pending evictions now (tests and metrics want exact counts).
    pub async fn run_pending_tasks(&self) {
        self.cache.run_pending_tasks().await;
    }
}
