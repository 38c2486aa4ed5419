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

use std::sync::{Arc, Weak};

use arc_swap::ArcSwapOption;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::future::Cache;
use moka::notification::RemovalCause;
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use futures_util::FutureExt as _;

use crate::registry::{
    CredentialId, ImageInfo, ImageRef, KeyedCredential, Platform, RegistryError, Resolution,
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
    reference: Arc<str>,
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

/// An image string as parsed once: the oci-spec grammar is a regex whose
/// backtracking search dominated a cache hit (about a third of a webhook
/// review's instructions under callgrind), so hits look the parse up instead.
///
/// It also keeps the last answer built for this string from the default
/// platform's entry: a hit on the same entry hands out that answer again
/// instead of formatting a new one (the pinned reference, the platform...).
#[derive(Debug)]
struct Parsed {
    reference: ImageRef,
    normalized: Arc<str>,
    last: ArcSwapOption<Built>,
}

/// An answer built from one cache entry; valid while that entry is current
/// (a refreshed or replaced entry is a new allocation, so `from` no longer
/// points at it).
#[derive(Debug)]
struct Built {
    from: Weak<Entry>,
    resolution: Arc<Resolution>,
    status: CacheStatus,
}

/// A [`Resolver`] with the shared cache in front. Cheap to clone.
#[derive(Clone)]
pub struct CachedResolver {
    resolver: Arc<Resolver>,
    cache: Cache<Key, Arc<Entry>>,
    /// Image string as written → its parse. Bounded like the answers.
    parsed: moka::sync::Cache<Box<str>, Arc<Parsed>>,
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
        let parsed = moka::sync::Cache::new(settings.capacity);
        Self {
            resolver,
            cache,
            parsed,
            settings,
            metrics,
        }
    }

    fn parse(&self, image: &str) -> Result<Arc<Parsed>, ResolveError> {
        if let Some(parsed) = self.parsed.get(image) {
            return Ok(parsed);
        }
        // Invalid strings are not remembered: they must not take the room
        // of valid ones, and their error is cheap to find again.
        let reference = self.resolver.parse(image)?;
        let parsed = Arc::new(Parsed {
            normalized: reference.to_string().into(),
            reference,
            last: ArcSwapOption::empty(),
        });
        self.parsed.insert(image.into(), parsed.clone());
        Ok(parsed)
    }

    fn key(
        &self,
        parsed: &Parsed,
        platform: &Platform,
        credential: Option<&KeyedCredential>,
    ) -> Key {
        Key {
            reference: parsed.normalized.clone(),
            platform: platform.clone(),
            credential: credential.map(|c| c.id),
        }
    }

    /// The answer for `image` if the cache can give it without waiting for
    /// the registry (fresh or stale-but-servable, or a remembered failure);
    /// `None` when a fetch is needed. Lets the webhook answer cache hits on
    /// its own task instead of spawning one per image.
    pub fn resolve_cached(
        &self,
        image: &str,
    ) -> Option<Result<(Arc<Resolution>, CacheStatus), ResolveError>> {
        let parsed = match self.parse(image) {
            Ok(p) => p,
            Err(e) => return Some(Err(e)),
        };
        let platform = self.resolver.default_platform();
        let credential = self.resolver.credential_for(&parsed.reference);
        let key = self.key(&parsed, platform, credential.as_deref());
        // moka's `get` does not wait on loads; it is async only in signature.
        let entry = self.cache.get(&key).now_or_never().flatten()?;
        let answer = self.serve(key, &entry, &parsed.reference, credential.as_ref())?;
        let (info, status) = match answer {
            Ok(found) => found,
            Err(source) => {
                return Some(Err(ResolveError::Registry {
                    image: image.to_string(),
                    source,
                }));
            }
        };
        if let Some(built) = &*parsed.last.load()
            && built.status == status
            && std::ptr::eq(built.from.as_ptr(), Arc::as_ptr(&entry))
        {
            return Some(Ok((built.resolution.clone(), status)));
        }
        let resolution =
            Arc::new(self.resolution(image, &parsed, &info, platform, credential.as_ref()));
        parsed.last.store(Some(Arc::new(Built {
            from: Arc::downgrade(&entry),
            resolution: resolution.clone(),
            status,
        })));
        Some(Ok((resolution, status)))
    }

    fn resolution(
        &self,
        image: &str,
        parsed: &Parsed,
        info: &ImageInfo,
        platform: &Platform,
        credential: Option<&Arc<KeyedCredential>>,
    ) -> Resolution {
        Resolution::new(
            image,
            &parsed.reference,
            info,
            platform,
            self.resolver.pull_secret_for(credential),
        )
    }

    /// What a cached entry gives: `None` when it is too stale to serve.
    fn serve(
        &self,
        key: Key,
        entry: &Arc<Entry>,
        reference: &ImageRef,
        credential: Option<&Arc<KeyedCredential>>,
    ) -> Option<Result<(ImageInfo, CacheStatus), RegistryError>> {
        let age = entry.fetched_at.elapsed();
        match &entry.outcome {
            Err(e) => {
                self.metrics.cache_lookup("negative");
                Some(Err(e.clone()))
            }
            Ok(info) if entry.pinned || age < self.settings.tag_ttl => {
                self.metrics.cache_lookup("hit");
                Some(Ok((info.clone(), CacheStatus::Hit)))
            }
            Ok(info) if age < self.settings.tag_ttl + self.settings.max_stale => {
                self.metrics.cache_lookup("stale");
                self.revalidate_in_background(key, entry.clone(), reference, credential);
                Some(Ok((info.clone(), CacheStatus::Stale)))
            }
            Ok(_) => None,
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
        let parsed = self.parse(image)?;
        let platform = platform.unwrap_or(self.resolver.default_platform());
        let credential = self.resolver.credential_for(&parsed.reference);
        let (info, status) = self
            .lookup(&parsed, platform, credential.as_ref())
            .await
            .map_err(|source| ResolveError::Registry {
                image: image.to_string(),
                source,
            })?;
        let resolution = self.resolution(image, &parsed, &info, platform, credential.as_ref());
        Ok((resolution, status))
    }

    async fn lookup(
        &self,
        parsed: &Parsed,
        platform: &Platform,
        credential: Option<&Arc<KeyedCredential>>,
    ) -> Result<(ImageInfo, CacheStatus), RegistryError> {
        let reference = &parsed.reference;
        let key = self.key(parsed, platform, credential.map(|c| &**c));
        if let Some(entry) = self.cache.get(&key).await {
            match self.serve(key.clone(), &entry, reference, credential) {
                Some(answer) => return answer,
                // Too stale to serve: fetch like a miss.
                None => self.cache.invalidate(&key).await,
            }
        }
        self.metrics.cache_lookup("miss");
        let pinned = reference.digest().is_some();
        let resolver = self.resolver.clone();
        let credential = credential.map(|c| &c.credential);
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
        credential: Option<&Arc<KeyedCredential>>,
    ) {
        if entry.revalidating.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        let reference = reference.clone();
        let credential = credential.cloned();
        tokio::spawn(async move {
            let Ok(old) = &entry.outcome else { return };
            let credential = credential.as_deref().map(|c| &c.credential);
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
